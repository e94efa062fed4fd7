// Measures the two ways of starting a process in a fresh cgroup, on the cgroup v2 hierarchy at
// CGROUP (default /sys/fs/cgroup/unified):
//   write   fork a child, then write its pid to <cgroup>/cgroup.procs (what cordon does on v1)
//   clone3  clone3(CLONE_INTO_CGROUP) straight into the cgroup (v2 only)
//   fork    clone3 without a cgroup, for comparison (the part of "clone3" that is just a fork)
// Each sample runs after a pause (PAUSE_MS, default 250), so the first cgroup write is not
// helped by an earlier one still holding the cgroup attach lock's fast path.
// Creates and removes only its own cgroup, cordon-bench-attach-<pid>.
//
// Build: cc -O2 -o cgroup_attach bench/cgroup_attach.c
// Usage: cgroup_attach [RUNS] [PAUSE_MS] [CGROUP]
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

static void report(const char *name, double *v, int n) {
  qsort(v, n, sizeof *v, cmp);
  printf("%-8s median %7.3f ms  p10 %7.3f  p90 %7.3f  (n=%d)\n", name, v[n / 2], v[n / 10],
         v[n * 9 / 10], n);
}

int main(int argc, char **argv) {
  int runs = argc > 1 ? atoi(argv[1]) : 20;
  int pause_ms = argc > 2 ? atoi(argv[2]) : 250;
  const char *root = argc > 3 ? argv[3] : "/sys/fs/cgroup/unified";
  if (runs < 1 || runs > 1000) {
    fprintf(stderr, "RUNS must be 1..1000\n");
    return 2;
  }
  char dir[512], procs[600];
  snprintf(dir, sizeof dir, "%s/cordon-bench-attach-%d", root, (int)getpid());
  snprintf(procs, sizeof procs, "%s/cgroup.procs", dir);
  if (mkdir(dir, 0755) != 0) {
    fprintf(stderr, "mkdir %s: %s\n", dir, strerror(errno));
    return 1;
  }
  int cgfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  int procs_fd = open(procs, O_WRONLY | O_CLOEXEC);
  double *w = calloc(runs, sizeof *w), *c = calloc(runs, sizeof *c), *f = calloc(runs, sizeof *f);
  int status = 0;
  if (cgfd < 0 || procs_fd < 0 || !w || !c || !f) {
    fprintf(stderr, "open %s: %s\n", dir, strerror(errno));
    status = 1;
    goto out;
  }
  for (int i = 0; i < runs; i++) {
    struct timespec pause = {pause_ms / 1000, (pause_ms % 1000) * 1000000L};
    nanosleep(&pause, NULL);
    int p[2];
    if (pipe(p) != 0) { status = 1; goto out; }
    pid_t pid = fork();
    if (pid == 0) {
      char b;
      close(p[1]);
      read(p[0], &b, 1);
      _exit(0);
    }
    close(p[0]);
    char buf[32];
    int len = snprintf(buf, sizeof buf, "%d", (int)pid);
    double t = now_ms();
    if (pwrite(procs_fd, buf, len, 0) != len) {
      fprintf(stderr, "write %s: %s\n", procs, strerror(errno));
      status = 1;
    }
    w[i] = now_ms() - t;
    close(p[1]);
    waitpid(pid, NULL, 0);
    if (status) goto out;

    nanosleep(&pause, NULL);
    struct clone_args args;
    memset(&args, 0, sizeof args);
    args.flags = CLONE_INTO_CGROUP;
    args.exit_signal = SIGCHLD;
    args.cgroup = (uint64_t)cgfd;
    t = now_ms();
    long r = syscall(SYS_clone3, &args, sizeof args);
    if (r == 0) _exit(0);
    c[i] = now_ms() - t;
    if (r < 0) {
      fprintf(stderr, "clone3(CLONE_INTO_CGROUP): %s\n", strerror(errno));
      status = 1;
      goto out;
    }
    waitpid((pid_t)r, NULL, 0);

    nanosleep(&pause, NULL);
    args.flags = 0;
    args.cgroup = 0;
    t = now_ms();
    r = syscall(SYS_clone3, &args, sizeof args);
    if (r == 0) _exit(0);
    f[i] = now_ms() - t;
    if (r < 0) { status = 1; goto out; }
    waitpid((pid_t)r, NULL, 0);
  }
  report("write", w, runs);
  report("clone3", c, runs);
  report("fork", f, runs);
out:
  if (procs_fd >= 0) close(procs_fd);
  if (cgfd >= 0) close(cgfd);
  if (rmdir(dir) != 0) fprintf(stderr, "rmdir %s: %s\n", dir, strerror(errno));
  return status;
}
