/* udpflood: sends UDP datagrams, each from a new source address and port (so each is a new conntrack entry
 * and walks the router's nat chain), as raw Ethernet frames on one interface, for a number of seconds.
 *
 *   udpflood IFACE SRC_MAC DST_MAC DST_IP DST_PORT SECONDS [SOURCES [PORTS]]
 *
 * Sources are the first SOURCES addresses of 10.11.0.0/16 (all of it by default), each cycle through them with
 * the next source port of 1024 to 1024 + PORTS - 1 (1024-65535 by default). With few sources and ports the
 * datagrams after the first SOURCES x PORTS belong to flows the router knows. Prints the number of frames
 * sent. Part of epokd's benchmarks (Benchmarks/EpokBench), run inside a throwaway network namespace. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <netinet/ip.h>
#include <netinet/udp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 256
#define FRAME (sizeof(struct ether_header) + sizeof(struct iphdr) + sizeof(struct udphdr) + 16)

static int parse_mac(const char *text, uint8_t mac[6])
{
    return sscanf(text, "%hhx:%hhx:%hhx:%hhx:%hhx:%hhx", &mac[0], &mac[1], &mac[2], &mac[3], &mac[4], &mac[5]) == 6 ? 0 : -1;
}

static uint16_t checksum(const void *data, size_t length)
{
    const uint16_t *words = data;
    uint32_t sum = 0;
    for (; length > 1; length -= 2)
        sum += *words++;
    if (length)
        sum += *(const uint8_t *)words;
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)~sum;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    if (argc < 7 || argc > 9) {
        fprintf(stderr, "usage: udpflood IFACE SRC_MAC DST_MAC DST_IP DST_PORT SECONDS [SOURCES [PORTS]]\n");
        return 2;
    }
    /* SOURCES: how many source addresses (10.11.0.0 upwards) to cycle through; 65536 by default. */
    /* PORTS: how many source ports (1024 upwards) each source cycles through; 64512 by default. SOURCES x PORTS
       datagrams are as many flows; every datagram after them belongs to one of them. */
    unsigned sources = argc >= 8 ? (unsigned)atoi(argv[7]) : 65536;
    unsigned ports = argc == 9 ? (unsigned)atoi(argv[8]) : 64512;
    if (sources == 0 || sources > 65536 || ports == 0 || ports > 64512) {
        fprintf(stderr, "udpflood: SOURCES must be 1 to 65536, PORTS 1 to 64512\n");
        return 2;
    }
    uint8_t source_mac[6], destination_mac[6];
    struct in_addr destination;
    if (parse_mac(argv[2], source_mac) || parse_mac(argv[3], destination_mac) || inet_pton(AF_INET, argv[4], &destination) != 1) {
        fprintf(stderr, "udpflood: bad address\n");
        return 2;
    }
    uint16_t port = (uint16_t)atoi(argv[5]);
    double seconds = atof(argv[6]);

    int fd = socket(AF_PACKET, SOCK_RAW, htons(ETH_P_IP));
    if (fd < 0) {
        perror("udpflood: socket");
        return 1;
    }
    int one = 1;
    setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one));
    struct sockaddr_ll link = { .sll_family = AF_PACKET, .sll_protocol = htons(ETH_P_IP), .sll_ifindex = (int)if_nametoindex(argv[1]),
                                .sll_halen = 6 };
    memcpy(link.sll_addr, destination_mac, 6);
    if (link.sll_ifindex == 0) {
        fprintf(stderr, "udpflood: no interface %s\n", argv[1]);
        return 1;
    }

    static uint8_t frames[BATCH][FRAME];
    struct iovec vectors[BATCH];
    struct mmsghdr messages[BATCH];
    for (int i = 0; i < BATCH; i++) {
        vectors[i] = (struct iovec){ .iov_base = frames[i], .iov_len = FRAME };
        messages[i] = (struct mmsghdr){ .msg_hdr = { .msg_name = &link, .msg_namelen = sizeof(link), .msg_iov = &vectors[i], .msg_iovlen = 1 } };
    }

    uint32_t counter = 0;
    unsigned long long sent = 0;
    double deadline = now() + seconds;
    while (now() < deadline) {
        for (int i = 0; i < BATCH; i++, counter++) {
            uint8_t *frame = frames[i];
            struct ether_header *eth = (struct ether_header *)frame;
            memcpy(eth->ether_dhost, destination_mac, 6);
            memcpy(eth->ether_shost, source_mac, 6);
            eth->ether_type = htons(ETH_P_IP);
            struct iphdr *ip = (struct iphdr *)(frame + sizeof(*eth));
            *ip = (struct iphdr){ .version = 4, .ihl = 5, .ttl = 64, .protocol = IPPROTO_UDP,
                                  .tot_len = htons(FRAME - sizeof(*eth)),
                                  .saddr = htonl(0x0A0B0000u | (unsigned)(counter % sources)), .daddr = destination.s_addr };
            ip->check = checksum(ip, sizeof(*ip));
            struct udphdr *udp = (struct udphdr *)(ip + 1);
            *udp = (struct udphdr){ .source = htons((uint16_t)(1024 + (counter / sources) % ports)), .dest = htons(port),
                                    .len = htons(sizeof(*udp) + 16), .check = 0 };
        }
        int n = sendmmsg(fd, messages, BATCH, 0);
        if (n > 0)
            sent += (unsigned long long)n;
    }
    printf("%llu\n", sent);
    return 0;
}
