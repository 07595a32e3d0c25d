/*
 * ptyrun COLS ROWS SECS CMD [ARG...] - run CMD on a new pseudo-terminal of
 * COLS x ROWS, copy everything it draws to stdout for SECS seconds, then type
 * "q" and wait up to 3 s more for it to exit. Exit status: CMD's, or 124 when
 * it had to be killed. For capturing a full-screen program (`vmm top`)
 * headless in the nested test bed, which has no script(1) or tmux.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pty.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* Copies what the pty has for up to `secs`; returns 1 when the pty closed. */
static int pump(int master, double secs)
{
	double end = now() + secs;
	char buf[4096];
	while (now() < end) {
		struct pollfd p = { .fd = master, .events = POLLIN };
		int ms = (int)((end - now()) * 1000) + 1;
		if (poll(&p, 1, ms) <= 0)
			continue;
		ssize_t n = read(master, buf, sizeof(buf));
		if (n <= 0)
			return 1;
		if (fwrite(buf, 1, (size_t)n, stdout) != (size_t)n)
			return 1;
	}
	return 0;
}

int main(int argc, char **argv)
{
	if (argc < 5) {
		fprintf(stderr, "usage: ptyrun COLS ROWS SECS CMD [ARG...]\n");
		return 2;
	}
	struct winsize ws = { .ws_col = (unsigned short)atoi(argv[1]),
			      .ws_row = (unsigned short)atoi(argv[2]) };
	double secs = atof(argv[3]);
	int master;
	pid_t pid = forkpty(&master, NULL, NULL, &ws);
	if (pid < 0) {
		perror("ptyrun: forkpty");
		return 1;
	}
	if (pid == 0) {
		setenv("TERM", "xterm", 1);
		execvp(argv[4], argv + 4);
		perror("ptyrun: exec");
		_exit(127);
	}
	if (!pump(master, secs)) {
		if (write(master, "q", 1) != 1)
			perror("ptyrun: write");
		pump(master, 3);
	}
	int status;
	pid_t done = 0;
	for (int i = 0; i < 300 && done == 0; i++) {
		done = waitpid(pid, &status, WNOHANG);
		if (done == 0)
			usleep(10000);
	}
	if (done == 0) {
		kill(pid, SIGKILL);
		waitpid(pid, &status, 0);
		fflush(stdout);
		return 124;
	}
	fflush(stdout);
	return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}
