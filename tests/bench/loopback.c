/*
 * loopback.c - this machine's floor for a loopback TCP relay: the CPU cost
 * of one recv + one send of a ~300-byte message, the unit of work a call
 * bridge repeats several times per 20 ms audio frame.
 *
 *   loopback [-n CONNS] [-b BYTES] [-t SECONDS] [-c CPU_A,CPU_B]
 *
 * Two processes, each pinned to its own CPU (default 0 and 1 when the
 * machine has two), share CONNS (200) loopback TCP connections. The driver
 * keeps one BYTES-byte (300) message in flight on every connection; the
 * echo side receives it and sends it back; the driver receives the echo
 * and sends the next. Both sides run an epoll loop, so each one does
 * exactly one recv and one send per message plus its share of epoll_wait.
 * After a 0.3 s warm-up, SECONDS (2) are measured.
 *
 * Output, one line:
 *   pair_us 8.76 echo_us 8.90 driver_us 8.63 send_us 7.41 recv_us 1.38 system_us 8.91 msgs 213209 conns 200 bytes 300
 * pair_us: the two processes' CPU time (user + system) per message per side
 * (= per recv+send pair, epoll_wait included); echo_us / driver_us: each
 * side alone; send_us / recv_us: how that splits, as the echo side's wall
 * time inside send() and recv() (on loopback a send also runs the peer's
 * TCP receive path, so it is the dear one); system_us: all CPU time the
 * machine spent (/proc/stat, both CPUs, softirq included) per pair, which
 * also counts kernel work charged to neither process. msgs: driver side.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAXCONN 4096

static int64_t now_ns(clockid_t clk)
{
	struct timespec ts;

	clock_gettime(clk, &ts);
	return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "loopback: %s: %s\n", what, strerror(errno));
	exit(1);
}

static void pin(int cpu)
{
	cpu_set_t set;

	if (cpu < 0)
		return;
	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	if (sched_setaffinity(0, sizeof set, &set) < 0)
		fprintf(stderr, "loopback: cannot pin to CPU %d: %s\n", cpu, strerror(errno));
}

/* Busy (non-idle) jiffies of the given CPUs from /proc/stat. */
static long long busy_ticks(int a, int b)
{
	FILE *f = fopen("/proc/stat", "r");
	char line[512];
	long long total = 0;

	if (!f)
		return -1;
	while (fgets(line, sizeof line, f)) {
		int cpu;
		long long v[10] = {0};

		if (strncmp(line, "cpu", 3) != 0 || line[3] < '0' || line[3] > '9')
			continue;
		if (sscanf(line, "cpu%d %lld %lld %lld %lld %lld %lld %lld %lld", &cpu, &v[0], &v[1], &v[2], &v[3],
			   &v[4], &v[5], &v[6], &v[7]) < 9)
			continue;
		/* user nice system idle iowait irq softirq steal */
		if ((a < 0 && b < 0) || cpu == a || cpu == b)
			total += v[0] + v[1] + v[2] + v[5] + v[6];
	}
	fclose(f);
	return total;
}

struct result {
	long long msgs;
	int64_t cpu_ns;
	int64_t recv_ns, send_ns;	/* echo side: wall time inside recv() / send() */
};

/*
 * The epoll loop of either side until `end`: the driver sends the next
 * message once the whole echo of the previous one came back; the echo side
 * sends back whatever it received. Counts the messages and the CPU time
 * between `start` and `end`.
 */
static struct result loop(int *fds, int n, int bytes, int driver, int64_t start, int64_t end, const int *cpus,
			  long long *ticks)
{
	int ep = epoll_create1(0);
	static char buf[65536], msg[65536];
	static int got[MAXCONN];
	struct epoll_event evs[1024];
	struct result r = {0, 0, 0, 0};
	long long total = 0, total0 = 0;
	int64_t cpu0 = 0;
	int measuring = 0;

	if (ep < 0)
		die("epoll_create1");
	memset(msg, 'x', sizeof msg);
	for (int i = 0; i < n; i++) {
		struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};

		if (epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev) < 0)
			die("epoll_ctl");
	}
	if (driver)
		for (int i = 0; i < n; i++)
			if (send(fds[i], msg, (size_t)bytes, MSG_NOSIGNAL) != bytes)
				die("send");
	for (;;) {
		int64_t t = now_ns(CLOCK_MONOTONIC);

		if (!measuring && t >= start) {
			measuring = 1;
			if (ticks)
				ticks[0] = busy_ticks(cpus[0], cpus[1]);
			cpu0 = now_ns(CLOCK_PROCESS_CPUTIME_ID);
			total0 = total;
		}
		if (t >= end)
			break;
		int ne = epoll_wait(ep, evs, 1024, 10);

		if (ne < 0 && errno != EINTR)
			die("epoll_wait");
		for (int e = 0; e < ne; e++) {
			int i = (int)evs[e].data.u32;
			int64_t ta = driver ? 0 : now_ns(CLOCK_MONOTONIC);
			ssize_t k = recv(fds[i], buf, sizeof buf, 0);
			int64_t tb = driver ? 0 : now_ns(CLOCK_MONOTONIC);

			if (k <= 0) {
				if (k < 0 && (errno == EAGAIN || errno == EINTR))
					continue;
				goto done;
			}
			if (driver) {
				got[i] += (int)k;
				while (got[i] >= bytes) {
					got[i] -= bytes;
					total++;
					if (send(fds[i], msg, (size_t)bytes, MSG_NOSIGNAL) != bytes)
						die("send");
				}
			} else {
				got[i] += (int)k;
				total += got[i] / bytes;
				got[i] %= bytes;
				if (send(fds[i], buf, (size_t)k, MSG_NOSIGNAL) != k)
					die("send");
				if (measuring) {
					r.recv_ns += tb - ta;
					r.send_ns += now_ns(CLOCK_MONOTONIC) - tb;
				}
			}
		}
	}
done:
	r.cpu_ns = now_ns(CLOCK_PROCESS_CPUTIME_ID) - cpu0;
	if (ticks)
		ticks[1] = busy_ticks(cpus[0], cpus[1]);
	r.msgs = total - total0;
	close(ep);
	return r;
}

int main(int argc, char **argv)
{
	int n = 200, bytes = 300, cpu_a = -1, cpu_b = -1;
	double seconds = 2;
	int opt;

	if (sysconf(_SC_NPROCESSORS_ONLN) >= 2)
		cpu_a = 0, cpu_b = 1;
	while ((opt = getopt(argc, argv, "n:b:t:c:")) != -1) {
		switch (opt) {
		case 'n': n = atoi(optarg); break;
		case 'b': bytes = atoi(optarg); break;
		case 't': seconds = atof(optarg); break;
		case 'c':
			if (sscanf(optarg, "%d,%d", &cpu_a, &cpu_b) != 2)
				cpu_a = cpu_b = -1;
			break;
		default:
			fprintf(stderr, "usage: loopback [-n CONNS] [-b BYTES] [-t SECONDS] [-c CPU_A,CPU_B]\n");
			return 2;
		}
	}
	if (n < 1 || n > MAXCONN || bytes < 1 || bytes > 65536 || seconds <= 0) {
		fprintf(stderr, "loopback: bad arguments\n");
		return 2;
	}

	int lfd = socket(AF_INET, SOCK_STREAM, 0);
	struct sockaddr_in sa = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
	socklen_t sl = sizeof sa;
	static int cfd[MAXCONN], sfd[MAXCONN];

	if (lfd < 0 || bind(lfd, (struct sockaddr *)&sa, sizeof sa) < 0 || listen(lfd, 4096) < 0 ||
	    getsockname(lfd, (struct sockaddr *)&sa, &sl) < 0)
		die("listen");
	for (int i = 0; i < n; i++) {
		int one = 1;

		cfd[i] = socket(AF_INET, SOCK_STREAM, 0);
		if (cfd[i] < 0 || connect(cfd[i], (struct sockaddr *)&sa, sizeof sa) < 0)
			die("connect");
		sfd[i] = accept(lfd, NULL, NULL);
		if (sfd[i] < 0)
			die("accept");
		setsockopt(cfd[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
		setsockopt(sfd[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
	}
	close(lfd);

	int64_t start = now_ns(CLOCK_MONOTONIC) + 300000000;
	int64_t end = start + (int64_t)(seconds * 1e9);
	int pfd[2];

	if (pipe(pfd) < 0)
		die("pipe");
	pid_t pid = fork();

	if (pid < 0)
		die("fork");
	if (pid == 0) {
		close(pfd[0]);
		for (int i = 0; i < n; i++)
			close(cfd[i]);
		pin(cpu_a);
		struct result r = loop(sfd, n, bytes, 0, start, end + 50000000, NULL, NULL);

		if (write(pfd[1], &r, sizeof r) != (ssize_t)sizeof r)
			_exit(1);
		_exit(0);
	}
	close(pfd[1]);
	for (int i = 0; i < n; i++)
		close(sfd[i]);
	pin(cpu_b);

	int cpus[2] = {cpu_a, cpu_b};
	long long ticks[2] = {0, 0};
	struct result d = loop(cfd, n, bytes, 1, start, end, cpus, ticks);
	double tick_ns = 1e9 / (double)sysconf(_SC_CLK_TCK);

	for (int i = 0; i < n; i++)
		close(cfd[i]);
	struct result e;

	if (read(pfd[0], &e, sizeof e) != (ssize_t)sizeof e) {
		fprintf(stderr, "loopback: echo process failed\n");
		waitpid(pid, NULL, 0);
		return 1;
	}
	waitpid(pid, NULL, 0);
	if (d.msgs <= 0 || e.msgs <= 0) {
		fprintf(stderr, "loopback: no messages went through\n");
		return 1;
	}
	printf("pair_us %.2f echo_us %.2f driver_us %.2f send_us %.2f recv_us %.2f system_us %.2f msgs %lld conns %d "
	       "bytes %d\n",
	       (double)(d.cpu_ns + e.cpu_ns) / 1e3 / (double)(d.msgs + e.msgs), (double)e.cpu_ns / 1e3 / (double)e.msgs,
	       (double)d.cpu_ns / 1e3 / (double)d.msgs, (double)e.send_ns / 1e3 / (double)e.msgs,
	       (double)e.recv_ns / 1e3 / (double)e.msgs,
	       (double)(ticks[1] - ticks[0]) * tick_ns / 1e3 / (double)(d.msgs + e.msgs), d.msgs, n, bytes);
	return 0;
}
