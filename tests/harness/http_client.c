// tests/harness/http_client.c: the loopback HTTP/1.1 client of http_client.h. Reads with a
// 30-second receive timeout so a server that hangs fails the test instead of blocking it.
#include "http_client.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

static int connect_to(int port) {
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0)
        return -1;
    struct timeval tv = {30, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, (struct sockaddr *)&a, sizeof a)) {
        close(fd);
        return -1;
    }
    return fd;
}

static int send_all(int fd, const char *p, size_t n) {
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k <= 0)
            return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static int send_request(int fd, const char *method, const char *path, const char *extra,
                        const char *body, size_t body_n) {
    char head[8192];
    int k = snprintf(head, sizeof head,
                     "%s %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n%s%s",
                     method, path, extra ? extra : "",
                     body ? "Content-Type: application/json\r\n" : "");
    if (body)
        k += snprintf(head + k, sizeof head - (size_t)k, "Content-Length: %zu\r\n", body_n);
    k += snprintf(head + k, sizeof head - (size_t)k, "\r\n");
    if (send_all(fd, head, (size_t)k))
        return -1;
    return body ? send_all(fd, body, body_n) : 0;
}

static bool find_header(const char *head, const char *name, char *buf, size_t cap) {
    size_t nl = strlen(name);
    for (const char *p = strstr(head, "\r\n"); p; p = strstr(p + 2, "\r\n")) {
        const char *line = p + 2;
        if (!strncasecmp(line, name, nl) && line[nl] == ':') {
            const char *v = line + nl + 1;
            while (*v == ' ')
                v++;
            size_t len = strcspn(v, "\r\n");
            snprintf(buf, cap, "%.*s", (int)len, v);
            return true;
        }
    }
    return false;
}

bool hc_header(const hc_resp *r, const char *name, char *buf, size_t cap) {
    return r->head && find_header(r->head, name, buf, cap);
}

int hc_stream_open(int port, const char *method, const char *path, const char *extra,
                   const char *body, size_t body_n, hc_stream *s) {
    memset(s, 0, sizeof *s);
    s->fd = connect_to(port);
    if (s->fd < 0 || send_request(s->fd, method, path, extra, body, body_n))
        return -1;
    // read until the end of the headers
    char *end = NULL;
    while (!end) {
        if (s->n == sizeof s->buf - 1)
            return -1;
        ssize_t k = recv(s->fd, s->buf + s->n, sizeof s->buf - 1 - s->n, 0);
        if (k <= 0)
            return -1;
        s->n += (size_t)k;
        s->buf[s->n] = 0;
        end = strstr(s->buf, "\r\n\r\n");
    }
    if (sscanf(s->buf, "HTTP/1.%*d %d", &s->status) != 1)
        return -1;
    *end = 0;
    char te[64];
    s->chunked = find_header(s->buf, "Transfer-Encoding", te, sizeof te) &&
                 strstr(te, "chunked");
    s->off = (size_t)(end + 4 - s->buf);
    return 0;
}

int hc_send(int port, const char *method, const char *path, const char *extra,
            const char *body, size_t body_n) {
    int fd = connect_to(port);
    if (fd >= 0 && send_request(fd, method, path, extra, body, body_n)) {
        close(fd);
        return -1;
    }
    return fd;
}

// Next raw byte of the connection; -1 at EOF or error.
static int raw_byte(hc_stream *s) {
    if (s->off == s->n) {
        ssize_t k = recv(s->fd, s->buf, sizeof s->buf, 0);
        if (k <= 0)
            return -1;
        s->n = (size_t)k;
        s->off = 0;
    }
    return (unsigned char)s->buf[s->off++];
}

ssize_t hc_stream_read(hc_stream *s, char *out, size_t cap) {
    if (s->eof)
        return 0;
    if (s->chunked && s->chunk_left == 0) {
        char line[64];
        size_t k = 0;
        int c;
        while ((c = raw_byte(s)) >= 0 && c != '\n')
            if (k < sizeof line - 1 && c != '\r')
                line[k++] = (char)c;
        line[k] = 0;
        if (c < 0)
            return -1;
        if (!k) // the CRLF after a chunk
            return hc_stream_read(s, out, cap);
        s->chunk_left = strtoul(line, NULL, 16);
        if (s->chunk_left == 0) {
            s->eof = true;
            return 0;
        }
    }
    size_t n = 0;
    while (n < cap && (!s->chunked || s->chunk_left > 0)) {
        if (s->off == s->n && n > 0)
            break;
        int c = raw_byte(s);
        if (c < 0) {
            if (s->chunked)
                return n ? (ssize_t)n : -1;
            s->eof = true;
            break;
        }
        out[n++] = (char)c;
        if (s->chunked)
            s->chunk_left--;
    }
    return (ssize_t)n;
}

void hc_stream_close(hc_stream *s) {
    if (s->fd >= 0)
        close(s->fd);
    s->fd = -1;
}

int hc_request(int port, const char *method, const char *path, const char *extra,
               const char *body, size_t body_n, hc_resp *out) {
    memset(out, 0, sizeof *out);
    hc_stream s;
    if (hc_stream_open(port, method, path, extra, body, body_n, &s)) {
        hc_stream_close(&s);
        return -1;
    }
    out->status = s.status;
    size_t hl = strlen(s.buf);
    out->head = malloc(hl + 1);
    memcpy(out->head, s.buf, hl + 1);
    size_t cap = 4096, n = 0;
    char *b = malloc(cap);
    for (;;) {
        if (cap - n < 2048)
            b = realloc(b, cap *= 2);
        ssize_t k = hc_stream_read(&s, b + n, cap - n - 1);
        if (k <= 0) {
            if (k < 0 && s.chunked) {
                free(b);
                hc_stream_close(&s);
                return -1;
            }
            break;
        }
        n += (size_t)k;
    }
    b[n] = 0;
    out->body = b;
    out->body_n = n;
    hc_stream_close(&s);
    return 0;
}

void hc_free(hc_resp *r) {
    free(r->head);
    free(r->body);
    memset(r, 0, sizeof *r);
}
