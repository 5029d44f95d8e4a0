/*
 * pdeathsig.c - the wrapper a child with kill_on_exit is started through
 * (src/process.c).
 *
 *   callagent-pdeathsig --pdeathsig PARENT SIGNAL ERRFD FILE ARGV0 [ARGS...]
 *   callagent --pdeathsig PARENT SIGNAL ERRFD FILE ARGV0 [ARGS...]
 *
 * libuv cannot run code in the child before the exec, so the child runs
 * this, which asks the kernel for SIGNAL when its parent dies (kept across
 * the exec) and becomes the program. If PARENT has died already (between
 * the fork and here), the program is not started. ERRFD (-1: none) is the
 * pipe the exec's failure goes back on, as libuv's own does: its errno, an
 * int; a successful exec closes it (EOF).
 *
 * callagent's spawn waits for that exec, so the wrapper must start fast:
 * built alone (-DCA_PDEATHSIG_MAIN) it is a program of its own that needs
 * only libc, which execs in a fraction of the time callagent takes to load
 * its 40 libraries. callagent itself runs the same code for --pdeathsig,
 * where the small program is missing.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "ca.h"

int ca__pdeathsig_main(int argc, char **argv)
{
	long parent, sig, fd;
	int err;

	if (argc < 7)
		return 127;
	parent = strtol(argv[2], NULL, 10);
	sig = strtol(argv[3], NULL, 10);
	fd = strtol(argv[4], NULL, 10);
	/* Never one of the program's stdio (a hand-made command line). */
	if (fd < 3 || fd > INT_MAX || fcntl((int)fd, F_SETFD, FD_CLOEXEC) != 0)
		fd = -1;
	if (prctl(PR_SET_PDEATHSIG, (unsigned long)sig) != 0 || getppid() != (pid_t)parent)
		return 127;
	execvp(argv[5], argv + 6);	/* as libuv: a script without #! runs with /bin/sh */
	err = errno;
	if (fd < 0 || write((int)fd, &err, sizeof err) != (ssize_t)sizeof err)
		fprintf(stderr, "callagent: cannot start %s: %s\n", argv[5], strerror(err));
	return 127;
}

#ifdef CA_PDEATHSIG_MAIN
int main(int argc, char **argv)
{
	if (argc < 2 || strcmp(argv[1], "--pdeathsig") != 0) {
		fprintf(stderr, "usage: callagent-pdeathsig --pdeathsig PARENT SIGNAL ERRFD FILE ARGV0 [ARGS...]\n"
			"(callagent starts its kill_on_exit children through it)\n");
		return 127;
	}
	return ca__pdeathsig_main(argc, argv);
}
#endif
