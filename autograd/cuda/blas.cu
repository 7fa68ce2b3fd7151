// autograd/cuda/blas.cu: matrix products on the GPU. cuBLASLt serves every single GEMM
// (row-major callers, f32 compute: bf16 operands with f32 accumulation, or f32 operands with
// TF32 off); cuBLAS serves the grouped GEMM of the routed experts
// (cublasGemmGroupedBatchedEx, cuBLAS 12.5 or newer), with a loop of single GEMMs where the
// library lacks it or refuses the types. Both libraries are opened on first use rather than
// linked: linking maps cuBLASLt and costs about 150 MB of resident memory in every molt
// process, GPU or not. Not here: the ops built on these products (k_*.cu).
#include "cu_internal.cuh"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

// Workspace handed to cuBLASLt so that it may pick its split-K and stream-K kernels.
#define LT_WORKSPACE_BYTES ((size_t)32 << 20)

#define LT_FN(x) decltype(&::x) f_##x
static struct {
    int state; // 0 not tried, 1 ready, -1 failed
    char why[256];
    void *lt_lib, *blas_lib;
    LT_FN(cublasLtCreate);
    LT_FN(cublasLtMatmulDescCreate);
    LT_FN(cublasLtMatmulDescDestroy);
    LT_FN(cublasLtMatmulDescSetAttribute);
    LT_FN(cublasLtMatrixLayoutCreate);
    LT_FN(cublasLtMatrixLayoutDestroy);
    LT_FN(cublasLtMatmul);
    LT_FN(cublasLtMatmulPreferenceCreate);
    LT_FN(cublasLtMatmulPreferenceDestroy);
    LT_FN(cublasLtMatmulPreferenceSetAttribute);
    LT_FN(cublasLtMatmulAlgoGetHeuristic);
    LT_FN(cublasCreate_v2);
    LT_FN(cublasSetStream_v2);
    LT_FN(cublasSetMathMode);
    // cublasGemmEx is overloaded in C++ (cublas_api.h): the C signature spelled out
    cublasStatus_t (*f_cublasGemmEx)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int,
                                     int, int, const void *, const void *, cudaDataType, int,
                                     const void *, cudaDataType, int, const void *, void *,
                                     cudaDataType, int, cublasComputeType_t, cublasGemmAlgo_t);
    decltype(&cublasGemmGroupedBatchedEx) grouped; // NULL before cuBLAS 12.5
    cublasLtHandle_t lt;
    cublasHandle_t blas;
    void *lt_ws;
    bool grouped_refused[2][2]; // [ab][c]: the grouped call said NOT_SUPPORTED once
} B;
static pthread_mutex_t blas_mu = PTHREAD_MUTEX_INITIALIZER;

static int open_lib(void **h, const char *name) {
    *h = cu_dlopen(name, B.why, sizeof B.why);
    return *h ? 0 : 1;
}

#define SYM(lib, field, name)                                                      \
    do {                                                                           \
        *(void **)&B.f_##field = dlsym(lib, name);                                     \
        if (!B.f_##field) {                                                            \
            snprintf(B.why, sizeof B.why, "symbol %s missing from cuBLAS", name);  \
            return 1;                                                              \
        }                                                                          \
    } while (0)

static int blas_open(void) {
    if (open_lib(&B.lt_lib, "libcublasLt.so." CUBLAS_SONAME_MAJOR) ||
        open_lib(&B.blas_lib, "libcublas.so." CUBLAS_SONAME_MAJOR))
        return 1;
    SYM(B.lt_lib, cublasLtCreate, "cublasLtCreate");
    SYM(B.lt_lib, cublasLtMatmulDescCreate, "cublasLtMatmulDescCreate");
    SYM(B.lt_lib, cublasLtMatmulDescDestroy, "cublasLtMatmulDescDestroy");
    SYM(B.lt_lib, cublasLtMatmulDescSetAttribute, "cublasLtMatmulDescSetAttribute");
    SYM(B.lt_lib, cublasLtMatrixLayoutCreate, "cublasLtMatrixLayoutCreate");
    SYM(B.lt_lib, cublasLtMatrixLayoutDestroy, "cublasLtMatrixLayoutDestroy");
    SYM(B.lt_lib, cublasLtMatmul, "cublasLtMatmul");
    SYM(B.lt_lib, cublasLtMatmulPreferenceCreate, "cublasLtMatmulPreferenceCreate");
    SYM(B.lt_lib, cublasLtMatmulPreferenceDestroy, "cublasLtMatmulPreferenceDestroy");
    SYM(B.lt_lib, cublasLtMatmulPreferenceSetAttribute, "cublasLtMatmulPreferenceSetAttribute");
    SYM(B.lt_lib, cublasLtMatmulAlgoGetHeuristic, "cublasLtMatmulAlgoGetHeuristic");
    SYM(B.blas_lib, cublasCreate_v2, "cublasCreate_v2");
    SYM(B.blas_lib, cublasSetStream_v2, "cublasSetStream_v2");
    SYM(B.blas_lib, cublasSetMathMode, "cublasSetMathMode");
    SYM(B.blas_lib, cublasGemmEx, "cublasGemmEx");
    *(void **)&B.grouped = dlsym(B.blas_lib, "cublasGemmGroupedBatchedEx"); // optional
    if (B.f_cublasLtCreate(&B.lt) != CUBLAS_STATUS_SUCCESS) {
        snprintf(B.why, sizeof B.why, "cublasLtCreate failed");
        return 1;
    }
    if (B.f_cublasCreate_v2(&B.blas) != CUBLAS_STATUS_SUCCESS ||
        B.f_cublasSetStream_v2(B.blas, cu_stream()) != CUBLAS_STATUS_SUCCESS ||
        B.f_cublasSetMathMode(B.blas, CUBLAS_DEFAULT_MATH) != CUBLAS_STATUS_SUCCESS) {
        snprintf(B.why, sizeof B.why, "cublasCreate failed");
        return 1;
    }
    cudaError_t e = cudaMalloc(&B.lt_ws, LT_WORKSPACE_BYTES);
    if (e != cudaSuccess) {
        snprintf(B.why, sizeof B.why, "cannot allocate the cuBLASLt workspace: %s",
                 cudaGetErrorString(e));
        return 1;
    }
    return 0;
}

int cu_blas_ready(void) {
    CU_TRY(cu_ready());
    pthread_mutex_lock(&blas_mu);
    if (B.state == 0)
        B.state = blas_open() ? -1 : 1;
    int st = B.state;
    pthread_mutex_unlock(&blas_mu);
    if (st < 0)
        return cu_fail(__FILE__, __LINE__, "cuBLAS: %s", B.why);
    return 0;
}

// The version of the cuBLAS library that would be opened; needs no GPU.
extern "C" int molt_cuda_cublas_version(int *v) {
    *v = 0;
    void *h = cu_dlopen("libcublas.so." CUBLAS_SONAME_MAJOR, NULL, 0);
    if (!h)
        return 1;
    typedef int (*get_property_fn)(int, int *); // cublasGetProperty(libraryPropertyType, int*)
    get_property_fn get = (get_property_fn)dlsym(h, "cublasGetProperty");
    int major = 0, minor = 0, patch = 0;
    int rc = !get || get(0, &major) || get(1, &minor) || get(2, &patch);
    if (!rc)
        *v = major * 10000 + minor * 100 + patch;
    dlclose(h);
    return rc;
}

extern "C" int molt_cuda_has_grouped_gemm(void) {
    return cu_blas_ready() == 0 && B.grouped != NULL;
}

static cudaDataType_t cuda_type(molt_cuda_dtype dt) {
    return dt == MOLT_CUDA_BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

static int check_dims(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc) {
    if (M < 0 || N < 0 || K < 0 || lda < 1 || ldb < 1 || ldc < 1)
        return cu_fail(__FILE__, __LINE__, "gemm: bad sizes M %lld N %lld K %lld lda %lld "
                       "ldb %lld ldc %lld", (long long)M, (long long)N, (long long)K,
                       (long long)lda, (long long)ldb, (long long)ldc);
    return 0;
}

// ---- algorithm choice -------------------------------------------------------------------
// cuBLASLt's heuristic is asked once per problem shape and operand alignment (pointers into
// the middle of a buffer, such as an expert's rows, are often aligned to less than the
// 256 bytes the heuristic otherwise assumes) and the answer is kept in a small per-thread
// cache.

typedef struct {
    int ab, c, ta, tb;
    int64_t M, N, K, lda, ldb, ldc;
    uint32_t al_a, al_b, al_c;
} algo_key;

typedef struct {
    bool used;
    algo_key key;
    cublasLtMatmulAlgo_t algo;
} algo_entry;

#define ALGO_CACHE 256
static thread_local algo_entry algo_cache[ALGO_CACHE];

static uint32_t alignment_of(const void *p) {
    uintptr_t a = (uintptr_t)p;
    uint32_t al = 256;
    while (al > 1 && a % al != 0)
        al >>= 1;
    return al;
}

static unsigned key_hash(const algo_key *k) {
    uint64_t h = 1469598103934665603ull;
    const unsigned char *p = (const unsigned char *)k;
    for (size_t i = 0; i < sizeof *k; i++)
        h = (h ^ p[i]) * 1099511628211ull;
    return (unsigned)(h % ALGO_CACHE);
}

// The algorithm for one call (descriptors already built); 0 or a failure.
static int pick_algo(const algo_key *key, cublasLtMatmulDesc_t op, cublasLtMatrixLayout_t la,
                     cublasLtMatrixLayout_t lb, cublasLtMatrixLayout_t lc,
                     cublasLtMatmulAlgo_t *algo) {
    algo_entry *e = &algo_cache[key_hash(key)];
    if (e->used && memcmp(&e->key, key, sizeof *key) == 0) {
        *algo = e->algo;
        return 0;
    }
    cublasLtMatmulPreference_t pref = NULL;
    uint64_t ws = LT_WORKSPACE_BYTES;
    // cuBLAS's A is our B and its B our A (see cu_gemm)
    uint32_t al_a = key->al_b, al_b = key->al_a, al_c = key->al_c;
    cublasStatus_t s = B.f_cublasLtMatmulPreferenceCreate(&pref);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = B.f_cublasLtMatmulPreferenceSetAttribute(
            pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof ws);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = B.f_cublasLtMatmulPreferenceSetAttribute(
            pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &al_a, sizeof al_a);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = B.f_cublasLtMatmulPreferenceSetAttribute(
            pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &al_b, sizeof al_b);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = B.f_cublasLtMatmulPreferenceSetAttribute(
            pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &al_c, sizeof al_c);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = B.f_cublasLtMatmulPreferenceSetAttribute(
            pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &al_c, sizeof al_c);
    cublasLtMatmulHeuristicResult_t res;
    int found = 0;
    if (s == CUBLAS_STATUS_SUCCESS)
        s = B.f_cublasLtMatmulAlgoGetHeuristic(B.lt, op, la, lb, lc, lc, pref, 1, &res, &found);
    if (pref)
        B.f_cublasLtMatmulPreferenceDestroy(pref);
    if (s != CUBLAS_STATUS_SUCCESS || found < 1)
        return cu_fail(__FILE__, __LINE__, "cuBLASLt has no algorithm for M %lld N %lld K %lld "
                       "(lda %lld ldb %lld ldc %lld, alignments %u/%u/%u): cuBLAS status %d",
                       (long long)key->M, (long long)key->N, (long long)key->K,
                       (long long)key->lda, (long long)key->ldb, (long long)key->ldc,
                       key->al_a, key->al_b, key->al_c, (int)s);
    e->used = true;
    e->key = *key;
    e->algo = res.algo;
    *algo = res.algo;
    return 0;
}

// Column-major view: row-major C (M, N) = op(A) op(B) is column-major C^T (N, M) =
// op(B)^T op(A)^T, so cuBLAS sees (m, n, k) = (N, M, K), its A is our B and its B our A,
// each transposed as we transpose ours.
int cu_gemm(molt_cuda_dtype ab, molt_cuda_dtype c, bool ta, bool tb, int64_t M, int64_t N,
            int64_t K, float alpha, const void *A, int64_t lda, const void *B_, int64_t ldb,
            float beta, void *C, int64_t ldc) {
    CU_TRY(check_dims(M, N, K, lda, ldb, ldc));
    if (M == 0 || N == 0)
        return 0;
    CU_TRY(cu_blas_ready());
    if (K == 0) { // C = beta C: cuBLASLt needs K >= 1
        if (beta == 1.0f)
            return 0;
        return cu_fail(__FILE__, __LINE__, "gemm: K == 0 with beta %g is not supported",
                       (double)beta);
    }
    cublasOperation_t opa = tb ? CUBLAS_OP_T : CUBLAS_OP_N; // cuBLAS's A = our B
    cublasOperation_t opb = ta ? CUBLAS_OP_T : CUBLAS_OP_N; // cuBLAS's B = our A
    uint64_t m = (uint64_t)N, n = (uint64_t)M, k = (uint64_t)K;
    cublasLtMatmulDesc_t op = NULL;
    cublasLtMatrixLayout_t la = NULL, lb = NULL, lc = NULL;
    cublasStatus_t s = B.f_cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = B.f_cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &opa, sizeof opa);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = B.f_cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &opb, sizeof opb);
    // stored shapes (column-major): cuBLAS's A is m x k (k x m when transposed), B k x n
    if (s == CUBLAS_STATUS_SUCCESS)
        s = B.f_cublasLtMatrixLayoutCreate(&la, cuda_type(ab), tb ? k : m, tb ? m : k,
                                           (int64_t)ldb);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = B.f_cublasLtMatrixLayoutCreate(&lb, cuda_type(ab), ta ? n : k, ta ? k : n,
                                           (int64_t)lda);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = B.f_cublasLtMatrixLayoutCreate(&lc, cuda_type(c), m, n, (int64_t)ldc);
    int rc = 0;
    if (s == CUBLAS_STATUS_SUCCESS) {
        algo_key key;
        memset(&key, 0, sizeof key); // padding too: the key is hashed and compared as bytes
        key.ab = (int)ab;
        key.c = (int)c;
        key.ta = ta;
        key.tb = tb;
        key.M = M;
        key.N = N;
        key.K = K;
        key.lda = lda;
        key.ldb = ldb;
        key.ldc = ldc;
        key.al_a = alignment_of(A);
        key.al_b = alignment_of(B_);
        key.al_c = alignment_of(C);
        cublasLtMatmulAlgo_t algo;
        rc = pick_algo(&key, op, la, lb, lc, &algo);
        if (!rc)
            s = B.f_cublasLtMatmul(B.lt, op, &alpha, B_, la, A, lb, &beta, C, lc, C, lc, &algo,
                                   B.lt_ws, LT_WORKSPACE_BYTES, cu_stream());
    }
    if (lc)
        B.f_cublasLtMatrixLayoutDestroy(lc);
    if (lb)
        B.f_cublasLtMatrixLayoutDestroy(lb);
    if (la)
        B.f_cublasLtMatrixLayoutDestroy(la);
    if (op)
        B.f_cublasLtMatmulDescDestroy(op);
    if (rc)
        return rc;
    if (s != CUBLAS_STATUS_SUCCESS)
        return cu_fail(__FILE__, __LINE__, "cublasLtMatmul (%s x %s -> %s, M %lld N %lld K "
                       "%lld, ta %d tb %d): cuBLAS status %d",
                       ab == MOLT_CUDA_BF16 ? "bf16" : "f32", ab == MOLT_CUDA_BF16 ? "bf16" : "f32",
                       c == MOLT_CUDA_BF16 ? "bf16" : "f32", (long long)M, (long long)N,
                       (long long)K, (int)ta, (int)tb, (int)s);
    return 0;
}

static int gemm_loop(molt_cuda_dtype ab, molt_cuda_dtype c, bool ta, bool tb, int n,
                     const int64_t *M, const int64_t *N, const int64_t *K, float alpha,
                     const void *const *A, int64_t lda, const void *const *B_, int64_t ldb,
                     float beta, void *const *C, int64_t ldc) {
    for (int i = 0; i < n; i++)
        if (M[i] > 0 && N[i] > 0 && K[i] > 0)
            CU_TRY(cu_gemm(ab, c, ta, tb, M[i], N[i], K[i], alpha, A[i], lda, B_[i], ldb, beta,
                           C[i], ldc));
    return 0;
}

#define GROUP_MAX 1024

int cu_gemm_grouped(molt_cuda_dtype ab, molt_cuda_dtype c, bool ta, bool tb, int n,
                    const int64_t *M, const int64_t *N, const int64_t *K, float alpha,
                    const void *const *A, int64_t lda, const void *const *B_, int64_t ldb,
                    float beta, void *const *C, int64_t ldc, void **ptrs) {
    CU_TRY(cu_blas_ready());
    bool fits = n <= GROUP_MAX && lda <= INT32_MAX && ldb <= INT32_MAX && ldc <= INT32_MAX;
    for (int i = 0; fits && i < n; i++)
        fits = M[i] <= INT32_MAX && N[i] <= INT32_MAX && K[i] <= INT32_MAX;
    if (!B.grouped || !fits || B.grouped_refused[ab][c])
        return gemm_loop(ab, c, ta, tb, n, M, N, K, alpha, A, lda, B_, ldb, beta, C, ldc);
    // host arrays of the non-empty problems, in cuBLAS's column-major terms
    static thread_local cublasOperation_t opa[GROUP_MAX], opb[GROUP_MAX];
    static thread_local int m[GROUP_MAX], nn[GROUP_MAX], k[GROUP_MAX], la[GROUP_MAX],
        lb[GROUP_MAX], lc[GROUP_MAX], one[GROUP_MAX];
    static thread_local float al[GROUP_MAX], be[GROUP_MAX];
    static thread_local const void *ha[GROUP_MAX], *hb[GROUP_MAX];
    static thread_local void *hc[GROUP_MAX];
    int g = 0;
    for (int i = 0; i < n; i++) {
        if (M[i] == 0 || N[i] == 0 || K[i] == 0)
            continue;
        opa[g] = tb ? CUBLAS_OP_T : CUBLAS_OP_N;
        opb[g] = ta ? CUBLAS_OP_T : CUBLAS_OP_N;
        m[g] = (int)N[i];
        nn[g] = (int)M[i];
        k[g] = (int)K[i];
        la[g] = (int)ldb;
        lb[g] = (int)lda;
        lc[g] = (int)ldc;
        one[g] = 1;
        al[g] = alpha;
        be[g] = beta;
        ha[g] = B_[i]; // cuBLAS's A is our B
        hb[g] = A[i];
        hc[g] = C[i];
        g++;
    }
    if (g == 0)
        return 0;
    // device pointer arrays: ptrs[0..g) A, [g..2g) B, [2g..3g) C (one copy, stream-ordered)
    static thread_local void *hp[3 * GROUP_MAX];
    for (int i = 0; i < g; i++) {
        hp[i] = (void *)ha[i];
        hp[g + i] = (void *)hb[i];
        hp[2 * g + i] = hc[i];
    }
    CU_CHECK(cudaMemcpyAsync(ptrs, hp, 3 * (size_t)g * sizeof(void *), cudaMemcpyHostToDevice,
                             cu_stream()));
    cudaDataType_t t = cuda_type(ab), tc = cuda_type(c);
    cublasStatus_t s = B.grouped(B.blas, opa, opb, m, nn, k, al, (const void *const *)ptrs, t,
                                 la, (const void *const *)(ptrs + g), t, lb, be, ptrs + 2 * g,
                                 tc, lc, g, one, CUBLAS_COMPUTE_32F);
    if (s == CUBLAS_STATUS_NOT_SUPPORTED) { // this type combination: loop from now on
        B.grouped_refused[ab][c] = true;
        return gemm_loop(ab, c, ta, tb, n, M, N, K, alpha, A, lda, B_, ldb, beta, C, ldc);
    }
    if (s != CUBLAS_STATUS_SUCCESS)
        return cu_fail(__FILE__, __LINE__, "cublasGemmGroupedBatchedEx (%d problems): cuBLAS "
                       "status %d", g, (int)s);
    return 0;
}

extern "C" int molt_cuda_gemm(molt_cuda_dtype ab, molt_cuda_dtype c, int ta, int tb, int64_t M,
                              int64_t N, int64_t K, float alpha, const void *A, int64_t lda,
                              const void *B_, int64_t ldb, float beta, void *C, int64_t ldc) {
    return cu_gemm(ab, c, ta != 0, tb != 0, M, N, K, alpha, A, lda, B_, ldb, beta, C, ldc);
}

// The classic cuBLAS GEMM on the same row-major problem: the baseline of the benchmarks.
extern "C" int molt_cuda_gemm_cublas(molt_cuda_dtype ab, molt_cuda_dtype c, int ta, int tb,
                                     int64_t M, int64_t N, int64_t K, float alpha, const void *A,
                                     int64_t lda, const void *B_, int64_t ldb, float beta, void *C,
                                     int64_t ldc) {
    CU_TRY(check_dims(M, N, K, lda, ldb, ldc));
    if (M > INT32_MAX || N > INT32_MAX || K > INT32_MAX || lda > INT32_MAX || ldb > INT32_MAX ||
        ldc > INT32_MAX)
        return cu_fail(__FILE__, __LINE__, "gemm_cublas: sizes beyond int");
    if (M == 0 || N == 0 || K == 0)
        return 0;
    CU_TRY(cu_blas_ready());
    CUBLAS_CHECK(B.f_cublasGemmEx(B.blas, tb ? CUBLAS_OP_T : CUBLAS_OP_N,
                                  ta ? CUBLAS_OP_T : CUBLAS_OP_N, (int)N, (int)M, (int)K, &alpha,
                                  B_, cuda_type(ab), (int)ldb, A, cuda_type(ab), (int)lda, &beta,
                                  C, cuda_type(c), (int)ldc, CUBLAS_COMPUTE_32F,
                                  CUBLAS_GEMM_DEFAULT));
    return 0;
}
