/* tcplatency: TCP connect latency through a host, for epokd's benchmarks (Benchmarks/EpokBench), run inside
 * throwaway network namespaces.
 *
 *   tcplatency serve IP PORT        accept connections on IP:PORT and close them, until killed
 *   tcplatency connect IP PORT N    N connects one after another, each closed at once with a reset
 *                                   (SO_LINGER 0: a new source port each time, no TIME_WAIT); prints
 *                                   "P50 P99 FAILED" with the latencies in microseconds
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static struct sockaddr_in address(const char *ip, const char *port)
{
    struct sockaddr_in a;
    memset(&a, 0, sizeof(a));
    a.sin_family = AF_INET;
    a.sin_port = htons((uint16_t)atoi(port));
    if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
        fprintf(stderr, "tcplatency: bad address %s\n", ip);
        exit(2);
    }
    return a;
}

static double microseconds(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec * 1e6 + (double)t.tv_nsec / 1e3;
}

static int ascending(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

int main(int argc, char **argv)
{
    if (argc == 4 && strcmp(argv[1], "serve") == 0) {
        struct sockaddr_in a = address(argv[2], argv[3]);
        int fd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        if (bind(fd, (struct sockaddr *)&a, sizeof(a)) != 0 || listen(fd, 4096) != 0) {
            perror("tcplatency: listen");
            return 1;
        }
        printf("listening\n");
        fflush(stdout);
        for (;;) {
            int client = accept(fd, NULL, NULL);
            if (client >= 0)
                close(client);
        }
    }
    if (argc == 5 && strcmp(argv[1], "connect") == 0) {
        struct sockaddr_in a = address(argv[2], argv[3]);
        int count = atoi(argv[4]), done = 0, failed = 0;
        double *latency = calloc((size_t)(count > 0 ? count : 1), sizeof(double));
        struct linger reset = {1, 0};
        for (int i = 0; i < count; i++) {
            int fd = socket(AF_INET, SOCK_STREAM, 0);
            setsockopt(fd, SOL_SOCKET, SO_LINGER, &reset, sizeof(reset));
            double start = microseconds();
            if (connect(fd, (struct sockaddr *)&a, sizeof(a)) == 0)
                latency[done++] = microseconds() - start;
            else
                failed++;
            close(fd);
        }
        if (done == 0) {
            fprintf(stderr, "tcplatency: no connect succeeded (%d failed)\n", failed);
            return 1;
        }
        qsort(latency, (size_t)done, sizeof(double), ascending);
        printf("%.1f %.1f %d\n", latency[done / 2], latency[(int)(done * 0.99)], failed);
        return 0;
    }
    fprintf(stderr, "usage: tcplatency serve IP PORT | tcplatency connect IP PORT N\n");
    return 2;
}
