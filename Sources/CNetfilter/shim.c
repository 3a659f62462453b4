#define _GNU_SOURCE
#include "CNetfilter.h"

#include <errno.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* Runs `fn(arg)` inside the network namespace `nsfd` (or right here when nsfd < 0)
 * on a thread of its own: the thread that entered the namespace exits with it,
 * so the process's other threads never leave their own namespace. What `fn`
 * opens there stays bound to that namespace. Returns 0, or -errno. */
static int in_namespace(int nsfd, void (*fn)(void *), void *arg);

struct namespace_call {
    int nsfd;
    void (*fn)(void *);
    void *arg;
    int result;
};

static void *enter_and_call(void *raw)
{
    struct namespace_call *call = raw;
    if (setns(call->nsfd, CLONE_NEWNET) != 0) {
        call->result = -errno;
        return NULL;
    }
    call->fn(call->arg);
    return NULL;
}

static int in_namespace(int nsfd, void (*fn)(void *), void *arg)
{
    if (nsfd < 0) {
        fn(arg);
        return 0;
    }
    struct namespace_call call = { .nsfd = nsfd, .fn = fn, .arg = arg, .result = 0 };
    pthread_t thread;
    int err = pthread_create(&thread, NULL, enter_and_call, &call);
    if (err != 0)
        return -err;
    pthread_join(thread, NULL);
    return call.result;
}

struct socket_request {
    int domain, type, protocol;
    int result;
};

static void open_socket(void *raw)
{
    struct socket_request *req = raw;
    int fd = socket(req->domain, req->type | SOCK_CLOEXEC, req->protocol);
    req->result = fd < 0 ? -errno : fd;
}

int cnf_socket_open(int domain, int type, int protocol, int nsfd)
{
    struct socket_request req = { .domain = domain, .type = type, .protocol = protocol, .result = -EINVAL };
    int err = in_namespace(nsfd, open_socket, &req);
    return err < 0 ? err : req.result;
}

struct file_request {
    const char *path;
    int flags;
    int result;
};

static void open_file(void *raw)
{
    struct file_request *req = raw;
    int fd = open(req->path, req->flags | O_CLOEXEC);
    req->result = fd < 0 ? -errno : fd;
}

int cnf_file_open(const char *path, int flags, int nsfd)
{
    struct file_request req = { .path = path, .flags = flags, .result = -EINVAL };
    int err = in_namespace(nsfd, open_file, &req);
    return err < 0 ? err : req.result;
}

int cnf_enter_network_namespace(int nsfd)
{
    return setns(nsfd, CLONE_NEWNET) == 0 ? 0 : -errno;
}

struct addresses_request {
    struct ifaddrs *list;
    int result;
};

static void read_addresses(void *raw)
{
    struct addresses_request *req = raw;
    req->result = getifaddrs(&req->list) == 0 ? 0 : -errno;
}

int cnf_getifaddrs(int nsfd, struct ifaddrs **list)
{
    struct addresses_request req = { .list = NULL, .result = -EINVAL };
    int err = in_namespace(nsfd, read_addresses, &req);
    if (err < 0)
        return err;
    *list = req.list;
    return req.result;
}

int cnf_batch_add_set_elements(struct nftnl_batch *batch, struct nftnl_set *set,
                               uint16_t msg_type, uint16_t family, uint16_t flags,
                               uint32_t *seq)
{
    struct nftnl_set_elems_iter *iter = nftnl_set_elems_iter_create(set);
    if (iter == NULL)
        return -ENOMEM;
    int messages = 0;
    while (nftnl_set_elems_iter_cur(iter) != NULL) {
        struct nlmsghdr *nlh = nftnl_nlmsg_build_hdr(nftnl_batch_buffer(batch), msg_type,
                                                     family, flags, (*seq)++);
        int more = nftnl_set_elems_nlmsg_build_payload_iter(nlh, iter);
        messages++;
        if (nftnl_batch_update(batch) < 0) {
            nftnl_set_elems_iter_destroy(iter);
            return -ENOMEM;
        }
        if (more <= 0)
            break;
    }
    nftnl_set_elems_iter_destroy(iter);
    return messages;
}

ssize_t cnf_batch_send(int fd, struct nftnl_batch *batch)
{
    int count = nftnl_batch_iovec_len(batch);
    struct iovec *iov = calloc((size_t)count, sizeof(struct iovec));
    if (iov == NULL)
        return -ENOMEM;
    nftnl_batch_iovec(batch, iov, (uint32_t)count);
    struct sockaddr_nl kernel = { .nl_family = AF_NETLINK };
    struct msghdr msg = {
        .msg_name = &kernel,
        .msg_namelen = sizeof(kernel),
        .msg_iov = iov,
        .msg_iovlen = (size_t)count,
    };
    ssize_t sent;
    do {
        sent = sendmsg(fd, &msg, 0);
    } while (sent < 0 && errno == EINTR);
    int saved = errno;
    free(iov);
    return sent < 0 ? -saved : sent;
}

struct cnf_set_search {
    const char *set;
    int found;
};

static int cnf_expr_names_set(struct nftnl_expr *e, void *data) {
    struct cnf_set_search *search = data;
    const char *kind = nftnl_expr_get_str(e, NFTNL_EXPR_NAME);
    const char *target = NULL;
    if (kind && strcmp(kind, "lookup") == 0)
        target = nftnl_expr_get_str(e, NFTNL_EXPR_LOOKUP_SET);
    else if (kind && strcmp(kind, "dynset") == 0)
        target = nftnl_expr_get_str(e, NFTNL_EXPR_DYNSET_SET_NAME);
    if (target && strcmp(target, search->set) == 0)
        search->found = 1;
    return 0;
}

int cnf_rule_names_set(struct nftnl_rule *rule, const char *set) {
    struct cnf_set_search search = { set, 0 };
    nftnl_expr_foreach(rule, cnf_expr_names_set, &search);
    return search.found;
}
