#include "ckpt_curl.h"
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

// libcurl's stable numbers (curl/curl.h): CURLOPTTYPE_LONG 0, OBJECTPOINT 10000,
// FUNCTIONPOINT 20000; CURLINFO_LONG 0x200000.
enum {
    OPT_WRITEDATA = 10001, OPT_URL = 10002, OPT_ERRORBUFFER = 10010, OPT_USERAGENT = 10018,
    OPT_HTTPHEADER = 10023, OPT_HEADERDATA = 10029, OPT_WRITEFUNCTION = 20011,
    OPT_HEADERFUNCTION = 20079, OPT_LOW_SPEED_LIMIT = 19, OPT_LOW_SPEED_TIME = 20,
    OPT_FOLLOWLOCATION = 52, OPT_MAXREDIRS = 68, OPT_CONNECTTIMEOUT = 78, OPT_NOSIGNAL = 99,
    OPT_HTTPGET = 80,
    INFO_RESPONSE_CODE = 0x200002,
    GLOBAL_DEFAULT = 3,
};

typedef void *(*easy_init_fn)(void);
typedef void (*easy_cleanup_fn)(void *);
typedef int (*easy_setopt_fn)(void *, int, ...);
typedef int (*easy_perform_fn)(void *);
typedef int (*easy_getinfo_fn)(void *, int, ...);
typedef const char *(*easy_strerror_fn)(int);
typedef void *(*slist_append_fn)(void *, const char *);
typedef void (*slist_free_all_fn)(void *);
typedef int (*global_init_fn)(long);
typedef const char *(*version_fn)(void);

static struct {
    easy_init_fn easy_init;
    easy_cleanup_fn easy_cleanup;
    easy_setopt_fn easy_setopt;
    easy_perform_fn easy_perform;
    easy_getinfo_fn easy_getinfo;
    easy_strerror_fn easy_strerror;
    slist_append_fn slist_append;
    slist_free_all_fn slist_free_all;
    version_fn version;
    int loaded;
    char error[256];
} curl;

static pthread_once_t load_once = PTHREAD_ONCE_INIT;

static void load(void) {
    // CKPT_LIBCURL names the library to load instead (one in an unusual place).
    const char *chosen = getenv("CKPT_LIBCURL");
    const char *names[] = {"libcurl.so.4", "libcurl-gnutls.so.4", "libcurl-nss.so.4", "libcurl.dylib", NULL};
    void *lib = NULL;
    if (chosen && *chosen) {
        lib = dlopen(chosen, RTLD_NOW | RTLD_LOCAL);
        if (!lib) {
            snprintf(curl.error, sizeof curl.error, "CKPT_LIBCURL=%s cannot be loaded: %s", chosen, dlerror());
            return;
        }
    }
    for (int i = 0; names[i] && !lib; i++) lib = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
    if (!lib) {
        snprintf(curl.error, sizeof curl.error, "libcurl is not installed (Debian/Ubuntu: apt install libcurl4; Fedora: dnf install libcurl)");
        return;
    }
#define SYM(field, name) if (!(*(void **)&curl.field = dlsym(lib, name))) { snprintf(curl.error, sizeof curl.error, "libcurl lacks %s", name); return; }
    SYM(easy_init, "curl_easy_init")
    SYM(easy_cleanup, "curl_easy_cleanup")
    SYM(easy_setopt, "curl_easy_setopt")
    SYM(easy_perform, "curl_easy_perform")
    SYM(easy_getinfo, "curl_easy_getinfo")
    SYM(easy_strerror, "curl_easy_strerror")
    SYM(slist_append, "curl_slist_append")
    SYM(slist_free_all, "curl_slist_free_all")
    SYM(version, "curl_version")
#undef SYM
    global_init_fn global_init = (global_init_fn)dlsym(lib, "curl_global_init");
    if (global_init && global_init(GLOBAL_DEFAULT) != 0) {
        snprintf(curl.error, sizeof curl.error, "curl_global_init failed");
        return;
    }
    curl.loaded = 1;
}

int ckpt_curl_load(char *error, size_t error_length) {
    pthread_once(&load_once, load);
    if (curl.loaded) return 0;
    if (error && error_length) snprintf(error, error_length, "%s", curl.error);
    return -1;
}

const char *ckpt_curl_version(void) { return curl.loaded ? curl.version() : ""; }

const char *ckpt_http_result_headers(const ckpt_http_result *result) { return result->headers; }

void *ckpt_http_handle_new(void) { return curl.loaded ? curl.easy_init() : NULL; }

void ckpt_http_handle_free(void *handle) {
    if (handle && curl.loaded) curl.easy_cleanup(handle);
}

typedef struct {
    ckpt_http_result *result;
    unsigned char *buffer;
    size_t capacity;
} transfer;

// One call per header line; a status line starts a new response (a redirect's headers are
// forgotten), and its code says whether the body that follows is data.
static size_t on_header(char *data, size_t size, size_t count, void *context) {
    transfer *t = context;
    size_t n = size * count;
    if (n >= 5 && memcmp(data, "HTTP/", 5) == 0) {
        t->result->headers_length = 0;
        t->result->headers_truncated = 0;
        const char *space = memchr(data, ' ', n);
        t->result->status = space ? strtol(space + 1, NULL, 10) : 0;
    }
    // libcurl passes one whole line per call: keep it whole, or not at all.
    if (n > sizeof t->result->headers - 1 - t->result->headers_length) {
        t->result->headers_truncated = 1;
        return n;
    }
    memcpy(t->result->headers + t->result->headers_length, data, n);
    t->result->headers_length += n;
    t->result->headers[t->result->headers_length] = 0;
    return n;
}

static size_t on_body(char *data, size_t size, size_t count, void *context) {
    transfer *t = context;
    size_t n = size * count;
    if (t->result->status < 200 || t->result->status > 299) return n;  // an error page
    if (n > t->capacity - t->result->received) {
        t->result->overflow = 1;
        return 0;  // aborts the transfer
    }
    memcpy(t->buffer + t->result->received, data, n);
    t->result->received += n;
    return n;
}

int ckpt_http_get(void *handle, const char *url, const char *const *header_lines, int header_count,
                  void *buffer, size_t capacity, long connect_timeout_seconds, long low_speed_seconds,
                  ckpt_http_result *result) {
    memset(result, 0, sizeof *result);
    if (!curl.loaded || !handle) {
        result->curl_code = -1;
        snprintf(result->curl_error, sizeof result->curl_error, "libcurl is not loaded");
        return -1;
    }
    transfer t = {result, buffer, capacity};
    void *list = NULL;
    for (int i = 0; i < header_count; i++) {
        void *next = curl.slist_append(list, header_lines[i]);
        if (!next) {
            curl.slist_free_all(list);
            result->curl_code = 27;  // CURLE_OUT_OF_MEMORY
            snprintf(result->curl_error, sizeof result->curl_error, "out of memory");
            return 27;
        }
        list = next;
    }
    curl.easy_setopt(handle, OPT_URL, url);
    curl.easy_setopt(handle, OPT_HTTPGET, 1L);
    curl.easy_setopt(handle, OPT_HTTPHEADER, list);
    curl.easy_setopt(handle, OPT_FOLLOWLOCATION, 1L);
    curl.easy_setopt(handle, OPT_MAXREDIRS, 10L);
    curl.easy_setopt(handle, OPT_NOSIGNAL, 1L);
    curl.easy_setopt(handle, OPT_CONNECTTIMEOUT, connect_timeout_seconds);
    // A transfer slower than 1 KB/s for this long is dropped (then resumed by the caller).
    curl.easy_setopt(handle, OPT_LOW_SPEED_LIMIT, 1024L);
    curl.easy_setopt(handle, OPT_LOW_SPEED_TIME, low_speed_seconds);
    curl.easy_setopt(handle, OPT_USERAGENT, "ckpt");
    curl.easy_setopt(handle, OPT_ERRORBUFFER, result->curl_error);
    curl.easy_setopt(handle, OPT_WRITEFUNCTION, on_body);
    curl.easy_setopt(handle, OPT_WRITEDATA, &t);
    curl.easy_setopt(handle, OPT_HEADERFUNCTION, on_header);
    curl.easy_setopt(handle, OPT_HEADERDATA, &t);
    int code = curl.easy_perform(handle);
    long status = 0;
    if (curl.easy_getinfo(handle, INFO_RESPONSE_CODE, &status) == 0 && status) result->status = status;
    curl.easy_setopt(handle, OPT_HTTPHEADER, (void *)NULL);
    curl.easy_setopt(handle, OPT_ERRORBUFFER, (void *)NULL);
    curl.slist_free_all(list);
    result->curl_code = code;
    if (code != 0 && result->curl_error[0] == 0) snprintf(result->curl_error, sizeof result->curl_error, "%s", curl.easy_strerror(code));
    return code;
}
