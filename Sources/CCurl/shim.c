#include "CCurl.h"
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>

struct ccurl_functions ccurl;

static char failure[512];
static const char *failed;
static pthread_once_t loaded = PTHREAD_ONCE_INIT;

static void load(void) {
    void *library = dlopen("libcurl.so.4", RTLD_NOW | RTLD_LOCAL);
    if (!library) {
        snprintf(failure, sizeof failure, "%s", dlerror());
        failed = failure;
        return;
    }
    struct { const char *name; void **slot; } symbols[] = {
        { "curl_global_init", (void **)&ccurl.global_init },
        { "curl_easy_init", (void **)&ccurl.easy_init },
        { "curl_easy_cleanup", (void **)&ccurl.easy_cleanup },
        { "curl_easy_perform", (void **)&ccurl.easy_perform },
        { "curl_easy_setopt", (void **)&ccurl.easy_setopt },
        { "curl_easy_getinfo", (void **)&ccurl.easy_getinfo },
        { "curl_easy_strerror", (void **)&ccurl.easy_strerror },
        { "curl_slist_append", (void **)&ccurl.slist_append },
        { "curl_slist_free_all", (void **)&ccurl.slist_free_all },
    };
    for (size_t i = 0; i < sizeof symbols / sizeof symbols[0]; i++) {
        if (!(*symbols[i].slot = dlsym(library, symbols[i].name))) {
            snprintf(failure, sizeof failure, "libcurl.so.4 has no %s", symbols[i].name);
            failed = failure;
            return;
        }
    }
    if (ccurl.global_init(CURL_GLOBAL_ALL) != CURLE_OK) {
        snprintf(failure, sizeof failure, "curl_global_init failed");
        failed = failure;
    }
}

const char *ccurl_load(void) {
    pthread_once(&loaded, load);
    return failed;
}
