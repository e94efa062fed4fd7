// LD_PRELOAD shim for bench/startup-profile.sh: times the libc calls that sandbox set-up and
// teardown consist of, at native speed (no ptrace stops, unlike strace), and writes one line per
// call to stderr:
//   @@T <pid> <start_ns> <duration_ns> <call> <detail>
// start_ns is CLOCK_MONOTONIC. Lines are written with one write(2) each, straight to fd 2, so
// they survive fork/clone into the sandbox's init (which keeps fd 2 and closes everything else).
// The sandboxed command itself never sees the shim: cordon scrubs LD_PRELOAD from its
// environment.
//
// Build: cc -O2 -shared -fPIC -o trace_shim.so bench/trace_shim.c -ldl
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static long now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void emit(long t0, const char *call, const char *fmt, ...) {
  long t1 = now_ns();
  char buf[512];
  int n = snprintf(buf, sizeof buf, "@@T %d %ld %ld %s ", (int)syscall(SYS_getpid), t0, t1 - t0, call);
  va_list ap;
  va_start(ap, fmt);
  if (n > 0 && n < (int)sizeof buf)
    n += vsnprintf(buf + n, sizeof buf - n, fmt, ap);
  va_end(ap);
  if (n >= (int)sizeof buf - 1)
    n = sizeof buf - 2;
  buf[n++] = '\n';
  syscall(SYS_write, 2, buf, n);
}

__attribute__((constructor)) static void started(void) {
  long t = now_ns();
  emit(t, "start", "");
}

__attribute__((destructor)) static void exiting(void) {
  long t = now_ns();
  emit(t, "exit", "");
}

#define REAL(ret, name, ...)                                                                    \
  static ret (*real_##name)(__VA_ARGS__);                                                       \
  if (!real_##name)                                                                             \
    real_##name = dlsym(RTLD_NEXT, #name);

long syscall(long nr, ...) {
  REAL(long, syscall, long, ...);
  va_list ap;
  va_start(ap, nr);
  long a = va_arg(ap, long), b = va_arg(ap, long), c = va_arg(ap, long);
  long d = va_arg(ap, long), e = va_arg(ap, long), f = va_arg(ap, long);
  va_end(ap);
  long t = now_ns();
  long r = real_syscall(nr, a, b, c, d, e, f);
  if (nr != SYS_write && nr != SYS_getpid && nr != SYS_getrandom)
    emit(t, "syscall", "nr=%ld a0=%ld ret=%ld", nr, a, r);
  return r;
}

int open64(const char *path, int flags, ...) {
  REAL(int, open64, const char *, int, ...);
  va_list ap;
  va_start(ap, flags);
  int mode = va_arg(ap, int);
  va_end(ap);
  long t = now_ns();
  int r = real_open64(path, flags, mode);
  emit(t, "open", "%s fd=%d", path, r);
  return r;
}

int openat64(int dirfd, const char *path, int flags, ...) {
  REAL(int, openat64, int, const char *, int, ...);
  va_list ap;
  va_start(ap, flags);
  int mode = va_arg(ap, int);
  va_end(ap);
  long t = now_ns();
  int r = real_openat64(dirfd, path, flags, mode);
  emit(t, "open", "%s fd=%d", path, r);
  return r;
}

int openat(int dirfd, const char *path, int flags, ...) {
  REAL(int, openat, int, const char *, int, ...);
  va_list ap;
  va_start(ap, flags);
  int mode = va_arg(ap, int);
  va_end(ap);
  long t = now_ns();
  int r = real_openat(dirfd, path, flags, mode);
  emit(t, "open", "%s fd=%d", path, r);
  return r;
}

ssize_t write(int fd, const void *buf, size_t n) {
  REAL(ssize_t, write, int, const void *, size_t);
  long t = now_ns();
  ssize_t r = real_write(fd, buf, n);
  if (fd > 2)
    emit(t, "write", "fd=%d n=%zu", fd, n);
  return r;
}

ssize_t pwrite64(int fd, const void *buf, size_t n, off_t off) {
  REAL(ssize_t, pwrite64, int, const void *, size_t, off_t);
  long t = now_ns();
  ssize_t r = real_pwrite64(fd, buf, n, off);
  emit(t, "pwrite", "fd=%d n=%zu", fd, n);
  return r;
}

int mount(const char *src, const char *target, const char *type, unsigned long flags,
          const void *data) {
  REAL(int, mount, const char *, const char *, const char *, unsigned long, const void *);
  long t = now_ns();
  int r = real_mount(src, target, type, flags, data);
  emit(t, "mount", "%s", target ? target : "-");
  return r;
}

int umount2(const char *target, int flags) {
  REAL(int, umount2, const char *, int);
  long t = now_ns();
  int r = real_umount2(target, flags);
  emit(t, "umount2", "%s", target);
  return r;
}

int mkdir(const char *path, mode_t mode) {
  REAL(int, mkdir, const char *, mode_t);
  long t = now_ns();
  int r = real_mkdir(path, mode);
  emit(t, "mkdir", "%s", path);
  return r;
}

int rmdir(const char *path) {
  REAL(int, rmdir, const char *);
  long t = now_ns();
  int r = real_rmdir(path);
  emit(t, "rmdir", "%s", path);
  return r;
}

int unlink(const char *path) {
  REAL(int, unlink, const char *);
  long t = now_ns();
  int r = real_unlink(path);
  emit(t, "unlink", "%s", path);
  return r;
}

int ioctl(int fd, unsigned long req, ...) {
  REAL(int, ioctl, int, unsigned long, ...);
  va_list ap;
  va_start(ap, req);
  void *arg = va_arg(ap, void *);
  va_end(ap);
  long t = now_ns();
  int r = real_ioctl(fd, req, arg);
  emit(t, "ioctl", "fd=%d req=0x%lx", fd, req);
  return r;
}

int prctl(int option, ...) {
  REAL(int, prctl, int, ...);
  va_list ap;
  va_start(ap, option);
  unsigned long a = va_arg(ap, unsigned long), b = va_arg(ap, unsigned long);
  unsigned long c = va_arg(ap, unsigned long), d = va_arg(ap, unsigned long);
  va_end(ap);
  long t = now_ns();
  int r = real_prctl(option, a, b, c, d);
  emit(t, "prctl", "opt=%d", option);
  return r;
}

pid_t fork(void) {
  REAL(pid_t, fork, void);
  long t = now_ns();
  pid_t r = real_fork();
  emit(t, "fork", "ret=%d", r);
  return r;
}

int execve(const char *path, char *const argv[], char *const envp[]) {
  long t = now_ns();
  emit(t, "execve", "%s", path);
  REAL(int, execve, const char *, char *const[], char *const[]);
  return real_execve(path, argv, envp);
}

int execvp(const char *file, char *const argv[]) {
  long t = now_ns();
  emit(t, "execve", "%s", file);
  REAL(int, execvp, const char *, char *const[]);
  return real_execvp(file, argv);
}

pid_t waitpid(pid_t pid, int *status, int options) {
  REAL(pid_t, waitpid, pid_t, int *, int);
  long t = now_ns();
  pid_t r = real_waitpid(pid, status, options);
  emit(t, "waitpid", "pid=%d ret=%d", pid, r);
  return r;
}

int waitid(idtype_t idtype, id_t id, siginfo_t *info, int options) {
  REAL(int, waitid, idtype_t, id_t, siginfo_t *, int);
  long t = now_ns();
  int r = real_waitid(idtype, id, info, options);
  emit(t, "waitid", "id=%d ret=%d", (int)id, r);
  return r;
}

int poll(struct pollfd *fds, nfds_t n, int timeout) {
  REAL(int, poll, struct pollfd *, nfds_t, int);
  long t = now_ns();
  int r = real_poll(fds, n, timeout);
  emit(t, "poll", "n=%lu ret=%d", (unsigned long)n, r);
  return r;
}

ssize_t recv(int fd, void *buf, size_t n, int flags) {
  REAL(ssize_t, recv, int, void *, size_t, int);
  long t = now_ns();
  ssize_t r = real_recv(fd, buf, n, flags);
  emit(t, "recv", "fd=%d", fd);
  return r;
}

ssize_t recvmsg(int fd, struct msghdr *m, int flags) {
  REAL(ssize_t, recvmsg, int, struct msghdr *, int);
  long t = now_ns();
  ssize_t r = real_recvmsg(fd, m, flags);
  emit(t, "recvmsg", "fd=%d", fd);
  return r;
}

int fsync(int fd) {
  REAL(int, fsync, int);
  long t = now_ns();
  int r = real_fsync(fd);
  emit(t, "fsync", "fd=%d", fd);
  return r;
}

int fdatasync(int fd) {
  REAL(int, fdatasync, int);
  long t = now_ns();
  int r = real_fdatasync(fd);
  emit(t, "fdatasync", "fd=%d", fd);
  return r;
}

ssize_t copy_file_range(int in, off64_t *oi, int out, off64_t *oo, size_t n, unsigned f) {
  REAL(ssize_t, copy_file_range, int, off64_t *, int, off64_t *, size_t, unsigned);
  long t = now_ns();
  ssize_t r = real_copy_file_range(in, oi, out, oo, n, f);
  emit(t, "copy_file_range", "n=%zu", n);
  return r;
}

int close(int fd) {
  REAL(int, close, int);
  long t = now_ns();
  int r = real_close(fd);
  if (now_ns() - t > 100000)
    emit(t, "close", "fd=%d", fd);
  return r;
}
