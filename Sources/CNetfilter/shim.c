#define _GNU_SOURCE
#include "CNetfilter.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

struct open_request {
    int domain;
    int type;
    int protocol;
    int nsfd;
    int result;
};

static void *open_in_namespace(void *arg)
{
    struct open_request *req = arg;
    if (req->nsfd >= 0 && setns(req->nsfd, CLONE_NEWNET) != 0) {
        req->result = -errno;
        return NULL;
    }
    int fd = socket(req->domain, req->type | SOCK_CLOEXEC, req->protocol);
    req->result = fd < 0 ? -errno : fd;
    return NULL;
}

int cnf_socket_open(int domain, int type, int protocol, int nsfd)
{
    struct open_request req = { .domain = domain, .type = type, .protocol = protocol, .nsfd = nsfd, .result = -EINVAL };
    if (nsfd < 0) {
        open_in_namespace(&req);
        return req.result;
    }
    /* The thread that entered the namespace exits with it: the process's
     * other threads never leave their own namespace. */
    pthread_t thread;
    int err = pthread_create(&thread, NULL, open_in_namespace, &req);
    if (err != 0)
        return -err;
    pthread_join(thread, NULL);
    return req.result;
}

struct file_request {
    const char *path;
    int flags;
    int nsfd;
    int result;
};

static void *open_file_in_namespace(void *arg)
{
    struct file_request *req = arg;
    if (req->nsfd >= 0 && setns(req->nsfd, CLONE_NEWNET) != 0) {
        req->result = -errno;
        return NULL;
    }
    int fd = open(req->path, req->flags | O_CLOEXEC);
    req->result = fd < 0 ? -errno : fd;
    return NULL;
}

int cnf_file_open(const char *path, int flags, int nsfd)
{
    struct file_request req = { .path = path, .flags = flags, .nsfd = nsfd, .result = -EINVAL };
    if (nsfd < 0) {
        open_file_in_namespace(&req);
        return req.result;
    }
    pthread_t thread;
    int err = pthread_create(&thread, NULL, open_file_in_namespace, &req);
    if (err != 0)
        return -err;
    pthread_join(thread, NULL);
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
