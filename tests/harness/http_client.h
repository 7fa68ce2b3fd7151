// tests/harness/http_client.h: a small HTTP/1.1 client over a loopback TCP socket for the
// server's tests (no libcurl): one request per connection, the response read whole (chunked
// transfer decoded), or its body read piece by piece for streams. Not a general client: no
// TLS, no redirects, no keep-alive.
#ifndef MOLT_TESTS_HTTP_CLIENT_H
#define MOLT_TESTS_HTTP_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <sys/types.h>

typedef struct {
    int status;
    char *head; // status line and headers
    char *body; // decoded body, NUL-terminated
    size_t body_n;
} hc_resp;

// Sends METHOD PATH to 127.0.0.1:port with extra header lines (each ending "\r\n", may be
// NULL) and a body (may be NULL), reads the whole response. Returns 0, or -1 when the
// connection failed or the response is malformed.
int hc_request(int port, const char *method, const char *path, const char *extra,
               const char *body, size_t body_n, hc_resp *out);
void hc_free(hc_resp *r);
// The value of a response header (case-insensitive name) into buf; false when absent.
bool hc_header(const hc_resp *r, const char *name, char *buf, size_t cap);

// A request whose response is read as it comes.
typedef struct {
    int fd;
    int status;
    bool chunked;
    char buf[65536];
    size_t n, off;
    size_t chunk_left; // bytes left in the current chunk
    bool eof;
} hc_stream;
// Connects, sends, reads the status line and headers. 0 or -1.
int hc_stream_open(int port, const char *method, const char *path, const char *extra,
                   const char *body, size_t body_n, hc_stream *s);
// Next decoded body bytes into out (up to cap); 0 at the end of the body, -1 on error.
ssize_t hc_stream_read(hc_stream *s, char *out, size_t cap);
void hc_stream_close(hc_stream *s); // closes the socket (the client "goes away")
// Connects and sends a request without reading anything; returns the socket or -1.
int hc_send(int port, const char *method, const char *path, const char *extra,
            const char *body, size_t body_n);

#endif
