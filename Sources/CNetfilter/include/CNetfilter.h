#ifndef CNETFILTER_H
#define CNETFILTER_H

/* Thin C shim over libmnl, libnftnl and libnetfilter_conntrack.
 * Only what Swift cannot express well lives here: macros, the sendmsg of a
 * multi-page batch, element paging, and opening a socket inside a network
 * namespace on a thread of its own. Everything else is called from Swift. */

/* <netinet/in.h> must come before any <linux/netfilter*.h> header. */
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <stdint.h>
#include <stddef.h>
#include <linux/netlink.h>
#include <linux/netfilter.h>
#include <linux/rtnetlink.h>
#include <linux/if_addr.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/netfilter/nfnetlink.h>
#include <linux/netfilter/nf_tables.h>
#include <linux/netfilter/nfnetlink_conntrack.h>
#include <libmnl/libmnl.h>
#include <libnftnl/batch.h>
#include <libnftnl/chain.h>
#include <libnftnl/common.h>
#include <libnftnl/expr.h>
#include <libnftnl/gen.h>
#include <libnftnl/rule.h>
#include <libnftnl/set.h>
#include <libnftnl/table.h>
#include <libnftnl/trace.h>
#include <libnftnl/udata.h>
#include <linux/netfilter/nf_conntrack_common.h>
#include <libnetfilter_conntrack/libnetfilter_conntrack.h>

/* Largest netlink message a dump answer may hold (MNL_SOCKET_BUFFER_SIZE). */
static inline size_t cnf_socket_buffer_size(void) { return MNL_SOCKET_BUFFER_SIZE; }

/* The nfnetlink message type of an nf_tables command. */
static inline uint16_t cnf_nftables_type(uint16_t cmd) { return (uint16_t)((NFNL_SUBSYS_NFTABLES << 8) | cmd); }

/* The nfnetlink message type of a ctnetlink command. */
static inline uint16_t cnf_conntrack_type(uint16_t cmd) { return (uint16_t)((NFNL_SUBSYS_CTNETLINK << 8) | cmd); }

/* Opens socket(domain, type, protocol) inside the network namespace `nsfd`
 * (or the caller's own when nsfd < 0). A dedicated thread enters the
 * namespace so that no other thread ever changes namespace; the socket
 * stays bound to that namespace. Returns the fd, or -errno. */
int cnf_socket_open(int domain, int type, int protocol, int nsfd);

/* Opens `path` with `flags` from inside the network namespace `nsfd` (or the
 * caller's own when nsfd < 0), on a thread of its own as cnf_socket_open does:
 * /proc/sys/net opened there is that namespace's. Returns the fd, or -errno. */
int cnf_file_open(const char *path, int flags, int nsfd);

/* Moves the calling thread into the network namespace `nsfd` for good: for a
 * thread of its own that does all its networking there (health probes).
 * Returns 0, or -errno. */
int cnf_enter_network_namespace(int nsfd);

/* getifaddrs(3) of the network namespace `nsfd` (or the caller's own when
 * nsfd < 0); free the list with freeifaddrs. Returns 0, or -errno. */
struct ifaddrs;
int cnf_getifaddrs(int nsfd, struct ifaddrs **list);

/* Appends the elements of `set` as `msg_type` messages (NFT_MSG_NEWSETELEM or
 * NFT_MSG_DELSETELEM), split so that no message exceeds 64 KiB. Each message
 * takes the next sequence number from *seq. Returns the number of messages,
 * or -errno. */
int cnf_batch_add_set_elements(struct nftnl_batch *batch, struct nftnl_set *set,
                               uint16_t msg_type, uint16_t family, uint16_t flags,
                               uint32_t *seq);

/* Sends every page of `batch` in one sendmsg to the kernel.
 * Returns the bytes sent, or -errno. */
ssize_t cnf_batch_send(int fd, struct nftnl_batch *batch);

/* Whether a rule names the set or map `set` (a lookup, a map or vmap, or a dynset update). */
int cnf_rule_names_set(struct nftnl_rule *rule, const char *set);

/* Tuple-filter flags of a ctnetlink dump (CTA_FILTER_ORIG_FLAGS / _REPLY_FLAGS);
 * the kernel defines them in a private header. */
enum {
    CNF_CTA_FILTER_IP_SRC = 1 << 0,
    CNF_CTA_FILTER_IP_DST = 1 << 1,
    CNF_CTA_FILTER_PROTO_NUM = 1 << 3,
    CNF_CTA_FILTER_PROTO_SRC_PORT = 1 << 4,
    CNF_CTA_FILTER_PROTO_DST_PORT = 1 << 5,
};

#endif
