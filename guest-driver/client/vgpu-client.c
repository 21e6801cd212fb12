// SPDX-License-Identifier: GPL-2.0
/*
 * vgpu-client - guest user-space client for /dev/vgpuN (virtio_vgpu.ko).
 *
 * Uses only the uapi header. Output is line-oriented and machine-greppable:
 * every device request prints one line
 *
 *   resp op=<name> status=<n> seq=<dispatch_seq> queue_ns=<n> exec_ns=<n> tag=<n>
 *
 * after the command's own result lines (for a device error status, before the
 * error message). See usage() for the commands.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <libgen.h>
#include <pthread.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <uapi/vgpu.h>

static const char *dev_path = "/dev/vgpu0";
static unsigned int timeout_ms;	/* 0: driver default */
static int quiet;		/* -q: no resp lines (bench) */

static void usage(FILE *f)
{
	fprintf(f,
"usage: vgpu-client [-d DEV] [-t TIMEOUT_MS] [-q] COMMAND [ARGS]\n"
"\n"
"  -d DEV         character device (default /dev/vgpu0)\n"
"  -t TIMEOUT_MS  per-request timeout given to the driver (default: driver's)\n"
"  -q             do not print the per-request resp line\n"
"\n"
"commands:\n"
"  info             host assignment from sysfs and GET_INFO from the device:\n"
"                     pool=A priority=2 priority_name=high vm_id=1\n"
"                     executor=cpu name=\"...\" memory=<bytes> cc=<maj.min> exec_limit_ms=<n>\n"
"  ping             one PING request\n"
"  add A B          SCALAR_ADD_I32 (legacy workload): prints A+B\n"
"  vector-add N     VECTOR_ADD_F32 of N random floats, checked: prints OK n=N or FAIL ...\n"
"  busy-wait MS     BUSY_WAIT: hold the GPU for MS milliseconds\n"
"  bench [N]        N PINGs (default 1000): bench n=N p50_us= p99_us= mean_us= min_us= max_us=\n"
"  flood N          N threads submit one PING each at the same moment:\n"
"                     flood n=N ok=N failed=0\n"
"  legacy-regs      read BAR0 of the vgpu-stub PCI device (1af4:1111):\n"
"                     legacy pci=<addr> magic=0x.. version=0x.. pool=A priority=N vm_id=N\n"
"\n"
"Every request prints, after its result line(s):\n"
"  resp op=<name> status=<n> seq=<dispatch_seq> queue_ns=<n> exec_ns=<n> tag=<n>\n"
"Exit status: 0 on success, 1 on any failure (device status != 0 included),\n"
"2 on bad usage. Errors go to stderr prefixed with 'vgpu-client: '.\n");
}

static void die(const char *fmt, ...)
{
	va_list ap;

	fputs("vgpu-client: ", stderr);
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fputc('\n', stderr);
	exit(1);
}

static const char *status_name(uint32_t s)
{
	static const char *const names[] = {
		"OK", "BAD_REQUEST", "UNSUPPORTED", "TOO_LARGE", "NO_RESOURCES",
		"DEVICE_ERROR", "TIMEOUT", "CANCELLED", "NOT_FOUND", "DENIED",
	};

	return s < sizeof(names) / sizeof(names[0]) ? names[s] : "UNKNOWN";
}

static int dev_open(void)
{
	int fd = open(dev_path, O_RDWR | O_CLOEXEC);

	if (fd < 0)
		die("open %s: %s", dev_path, strerror(errno));
	return fd;
}

/* The per-request line, printed after the command's own result. */
static void print_resp(const char *name, const struct vgpu_submit *s)
{
	if (quiet)
		return;
	printf("resp op=%s status=%" PRIu32 " seq=%" PRIu64
	       " queue_ns=%" PRIu64 " exec_ns=%" PRIu64 " tag=%" PRIu64 "\n",
	       name, (uint32_t)le32toh(s->resp.status),
	       (uint64_t)le64toh(s->resp.dispatch_seq),
	       (uint64_t)le64toh(s->resp.queue_ns),
	       (uint64_t)le64toh(s->resp.exec_ns),
	       (uint64_t)le64toh(s->resp.tag));
}

/*
 * Submit one request; on success the device's response header is in s->resp.
 * Returns the device status; exits on a driver error.
 */
static uint32_t submit(int fd, const char *name, uint16_t op,
		       const void *payload, uint32_t plen,
		       void *out, uint32_t ocap, struct vgpu_submit *s)
{
	static uint64_t next_tag = 1;
	uint32_t status;

	memset(s, 0, sizeof(*s));
	s->opcode = op;
	s->tag = ((uint64_t)getpid() << 32) | next_tag++;
	s->payload = (uintptr_t)payload;
	s->payload_len = plen;
	s->output = (uintptr_t)out;
	s->output_cap = ocap;
	s->timeout_ms = timeout_ms;
	if (ioctl(fd, VGPU_IOC_SUBMIT, s) < 0)
		die("%s: VGPU_IOC_SUBMIT: %s", name, strerror(errno));

	status = le32toh(s->resp.status);
	if (status != VGPU_S_OK)
		print_resp(name, s);
	if (le64toh(s->resp.tag) != s->tag)
		die("%s: response tag %" PRIu64 " != request tag %" PRIu64,
		    name, (uint64_t)le64toh(s->resp.tag), (uint64_t)s->tag);
	return status;
}

static void check_status(const char *name, uint32_t status)
{
	if (status != VGPU_S_OK)
		die("%s: device status %u (%s)", name, status,
		    status_name(status));
}

static int read_sysfs(const char *dir, const char *attr, char *buf, size_t len)
{
	char path[512];
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "%s/%s", dir, attr);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	n = read(fd, buf, len - 1);
	close(fd);
	if (n < 0)
		return -1;
	buf[n] = '\0';
	buf[strcspn(buf, "\n")] = '\0';
	return 0;
}

static int cmd_info(void)
{
	char dir[300], pool[32], prio[32], pname[32], vmid[32], devcopy[256];
	struct vgpu_submit s;
	struct vgpu_info info;
	uint32_t cc;
	int fd;

	snprintf(devcopy, sizeof(devcopy), "%s", dev_path);
	snprintf(dir, sizeof(dir), "/sys/class/misc/%s", basename(devcopy));
	if (read_sysfs(dir, "pool_id", pool, sizeof(pool)) ||
	    read_sysfs(dir, "priority", prio, sizeof(prio)) ||
	    read_sysfs(dir, "priority_name", pname, sizeof(pname)) ||
	    read_sysfs(dir, "vm_id", vmid, sizeof(vmid)))
		die("info: cannot read %s/{pool_id,priority,priority_name,vm_id}: %s",
		    dir, strerror(errno));
	printf("pool=%s priority=%s priority_name=%s vm_id=%s\n",
	       pool, prio, pname, vmid);

	fd = dev_open();
	memset(&info, 0, sizeof(info));
	check_status("info", submit(fd, "info", VGPU_OP_GET_INFO, NULL, 0,
				    &info, sizeof(info), &s));
	if (s.output_len < offsetof(struct vgpu_info, name) + 1)
		die("info: GET_INFO returned %u bytes", s.output_len);
	info.name[sizeof(info.name) - 1] = '\0';
	cc = le32toh(info.compute_capability);
	printf("executor=%s gpu_index=%u name=\"%s\" memory=%" PRIu64
	       " cc=%u.%u exec_limit_ms=%u\n",
	       le32toh(info.executor) == VGPU_EXECUTOR_CUDA ? "cuda" :
	       le32toh(info.executor) == VGPU_EXECUTOR_CPU ? "cpu" : "unknown",
	       le32toh(info.gpu_index), info.name,
	       (uint64_t)le64toh(info.memory_total), cc >> 16, cc & 0xffff,
	       le32toh(info.exec_limit_ms));
	print_resp("info", &s);
	close(fd);
	return 0;
}

static int cmd_ping(void)
{
	struct vgpu_submit s;
	int fd = dev_open();

	check_status("ping", submit(fd, "ping", VGPU_OP_PING, NULL, 0, NULL, 0,
				    &s));
	printf("pong\n");
	print_resp("ping", &s);
	close(fd);
	return 0;
}

static long parse_long(const char *what, const char *arg, long min, long max)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(arg, &end, 0);
	if (errno || *end || end == arg || v < min || v > max) {
		fprintf(stderr, "vgpu-client: bad %s '%s' (%ld..%ld)\n",
			what, arg, min, max);
		exit(2);
	}
	return v;
}

static int cmd_add(const char *a, const char *b)
{
	int32_t in[2];
	uint32_t out = 0;
	struct vgpu_submit s;
	int fd;

	in[0] = htole32((uint32_t)parse_long("A", a, INT32_MIN, INT32_MAX));
	in[1] = htole32((uint32_t)parse_long("B", b, INT32_MIN, INT32_MAX));
	fd = dev_open();
	uint32_t st = submit(fd, "add", VGPU_OP_SCALAR_ADD_I32, in, sizeof(in),
			     &out, sizeof(out), &s);

	check_status("add", st);
	if (s.output_len != sizeof(out))
		die("add: output is %u bytes, expected 4", s.output_len);
	printf("%" PRId32 "\n", (int32_t)le32toh(out));
	print_resp("add", &s);
	close(fd);
	return 0;
}

static int cmd_vector_add(const char *arg)
{
	uint32_t n = parse_long("N", arg, 1, (VGPU_MAX_PAYLOAD - 8) / 8);
	size_t plen = 8 + (size_t)n * 8;
	uint32_t *payload = malloc(plen);
	float *a, *b, *out = malloc((size_t)n * 4);
	uint32_t bad = 0, first = 0, i;
	struct vgpu_submit s;
	int fd;

	if (!payload || !out)
		die("vector-add: out of memory");
	payload[0] = htole32(n);
	payload[1] = 0;
	a = (float *)(payload + 2);
	b = a + n;
	srand48(time(NULL) ^ getpid());
	for (i = 0; i < n; i++) {
		a[i] = (float)(drand48() * 2000.0 - 1000.0);
		b[i] = (float)(drand48() * 2000.0 - 1000.0);
	}
	fd = dev_open();
	check_status("vector-add", submit(fd, "vector-add",
					  VGPU_OP_VECTOR_ADD_F32, payload,
					  plen, out, n * 4, &s));
	if (s.output_len != n * 4)
		die("vector-add: output is %u bytes, expected %u",
		    s.output_len, n * 4);
	/* x86 floats are little-endian, so the wire format is the host's. */
	for (i = 0; i < n; i++) {
		if (out[i] != a[i] + b[i]) {
			if (!bad)
				first = i;
			bad++;
		}
	}
	if (bad) {
		printf("FAIL n=%u mismatches=%u first=%u got=%g want=%g\n",
		       n, bad, first, out[first], a[first] + b[first]);
		print_resp("vector-add", &s);
		return 1;
	}
	printf("OK n=%u\n", n);
	print_resp("vector-add", &s);
	close(fd);
	free(payload);
	free(out);
	return 0;
}

static int cmd_busy_wait(const char *arg)
{
	long ms = parse_long("MS", arg, 0, 3600 * 1000);
	uint64_t ns = htole64((uint64_t)ms * 1000000u);
	struct vgpu_submit s;
	int fd;

	/* Wait longer than the device holds the GPU, unless told otherwise. */
	if (!timeout_ms)
		timeout_ms = ms + VGPU_DEFAULT_TIMEOUT_MS < VGPU_MAX_TIMEOUT_MS ?
			ms + VGPU_DEFAULT_TIMEOUT_MS : VGPU_MAX_TIMEOUT_MS;
	fd = dev_open();
	check_status("busy-wait", submit(fd, "busy-wait", VGPU_OP_BUSY_WAIT,
					 &ns, sizeof(ns), NULL, 0, &s));
	printf("busy-wait done ms=%ld\n", ms);
	print_resp("busy-wait", &s);
	close(fd);
	return 0;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec;
}

static int cmd_bench(const char *arg)
{
	long n = arg ? parse_long("N", arg, 1, 10000000) : 1000;
	uint64_t *lat = calloc(n, sizeof(*lat)), sum = 0;
	struct vgpu_submit s;
	long i;
	int fd;

	if (!lat)
		die("bench: out of memory");
	fd = dev_open();
	quiet = 1;
	for (i = 0; i < n; i++) {
		uint64_t t0 = now_ns();

		check_status("bench", submit(fd, "ping", VGPU_OP_PING, NULL, 0,
					     NULL, 0, &s));
		lat[i] = now_ns() - t0;
		sum += lat[i];
	}
	qsort(lat, n, sizeof(*lat), cmp_u64);
	printf("bench n=%ld p50_us=%.1f p99_us=%.1f mean_us=%.1f min_us=%.1f max_us=%.1f\n",
	       n, lat[n / 2] / 1e3, lat[(n * 99) / 100 < n ? (n * 99) / 100 : n - 1] / 1e3,
	       (double)sum / n / 1e3, lat[0] / 1e3, lat[n - 1] / 1e3);
	close(fd);
	free(lat);
	return 0;
}

struct flood_arg {
	int fd;
	pthread_barrier_t *start;
	int err;		/* errno of the ioctl, or 0 */
	uint32_t status;
};

/*
 * One request per thread, all released at once by a barrier, so that more
 * requests are outstanding than the ring and the daemon's queue can hold:
 * the driver must make the surplus wait for ring space, not fail it.
 */
static void *flood_one(void *p)
{
	struct flood_arg *a = p;
	struct vgpu_submit s;

	memset(&s, 0, sizeof(s));
	s.opcode = VGPU_OP_PING;
	s.timeout_ms = timeout_ms;
	pthread_barrier_wait(a->start);
	if (ioctl(a->fd, VGPU_IOC_SUBMIT, &s) < 0)
		a->err = errno;
	else
		a->status = le32toh(s.resp.status);
	return NULL;
}

static int cmd_flood(const char *arg)
{
	long n = parse_long("N", arg, 1, 4096), i, ok = 0, failed = 0;
	struct flood_arg *args = calloc(n, sizeof(*args));
	pthread_t *th = calloc(n, sizeof(*th));
	pthread_barrier_t start;
	pthread_attr_t attr;
	int fd, first_err = 0;

	if (!args || !th)
		die("flood: out of memory");
	fd = dev_open();
	pthread_barrier_init(&start, NULL, n);
	pthread_attr_init(&attr);
	pthread_attr_setstacksize(&attr, 64 * 1024);
	for (i = 0; i < n; i++) {
		args[i].fd = fd;
		args[i].start = &start;
		errno = pthread_create(&th[i], &attr, flood_one, &args[i]);
		if (errno)
			die("flood: thread %ld: %s", i, strerror(errno));
	}
	for (i = 0; i < n; i++) {
		pthread_join(th[i], NULL);
		if (!args[i].err && args[i].status == VGPU_S_OK) {
			ok++;
		} else {
			failed++;
			if (!first_err)
				first_err = args[i].err ? args[i].err : -1;
		}
	}
	printf("flood n=%ld ok=%ld failed=%ld%s%s\n", n, ok, failed,
	       first_err > 0 ? " first_error=" : "",
	       first_err > 0 ? strerror(first_err) : "");
	close(fd);
	free(args);
	free(th);
	return failed ? 1 : 0;
}

static unsigned long read_hex(const char *dir, const char *attr)
{
	char buf[64];

	if (read_sysfs(dir, attr, buf, sizeof(buf)))
		return ~0ul;
	return strtoul(buf, NULL, 16);
}

static int cmd_legacy_regs(void)
{
	const char *base = "/sys/bus/pci/devices";
	char dir[512], path[600], addr[256];
	struct dirent *de;
	volatile uint32_t *regs;
	char en[8];
	DIR *d;
	int fd;

	d = opendir(base);
	if (!d)
		die("legacy-regs: %s: %s", base, strerror(errno));
	while ((de = readdir(d))) {
		if (de->d_name[0] == '.')
			continue;
		snprintf(dir, sizeof(dir), "%s/%s", base, de->d_name);
		if (read_hex(dir, "vendor") == 0x1af4 &&
		    read_hex(dir, "device") == 0x1111)
			break;
	}
	if (!de)
		die("legacy-regs: no PCI device 1af4:1111 under %s", base);
	/* de points into d: keep the name before closing it. */
	snprintf(addr, sizeof(addr), "%s", de->d_name);
	closedir(d);

	/*
	 * No driver binds the stub, so memory decoding may be off: enabling
	 * it through sysfs makes BAR0 readable.
	 */
	if (!read_sysfs(dir, "enable", en, sizeof(en)) && en[0] == '0') {
		snprintf(path, sizeof(path), "%s/enable", dir);
		fd = open(path, O_WRONLY | O_CLOEXEC);
		if (fd < 0 || write(fd, "1", 1) != 1)
			die("legacy-regs: enable %s: %s", path, strerror(errno));
		close(fd);
	}

	snprintf(path, sizeof(path), "%s/resource0", dir);
	fd = open(path, O_RDONLY | O_SYNC | O_CLOEXEC);
	if (fd < 0)
		die("legacy-regs: open %s: %s", path, strerror(errno));
	regs = mmap(NULL, 4096, PROT_READ, MAP_SHARED, fd, 0);
	if (regs == MAP_FAILED)
		die("legacy-regs: mmap %s: %s", path, strerror(errno));

	uint32_t magic = le32toh(regs[0]), version = le32toh(regs[1]);
	uint32_t pool = le32toh(regs[2]), prio = le32toh(regs[3]);
	uint32_t vm_id = le32toh(regs[4]);

	printf("legacy pci=%s magic=0x%08x version=0x%08x pool=%c priority=%u vm_id=%u\n",
	       addr, magic, version,
	       pool > 0x20 && pool < 0x7f ? (char)pool : '?', prio, vm_id);
	munmap((void *)regs, 4096);
	close(fd);
	if (magic != VGPU_MAGIC)
		die("legacy-regs: magic 0x%08x, expected 0x%08x", magic,
		    VGPU_MAGIC);
	return 0;
}

int main(int argc, char **argv)
{
	const char *cmd;
	int c;

	while ((c = getopt(argc, argv, "+d:t:qh")) != -1) {
		switch (c) {
		case 'd':
			dev_path = optarg;
			break;
		case 't':
			timeout_ms = parse_long("timeout", optarg, 1,
						VGPU_MAX_TIMEOUT_MS);
			break;
		case 'q':
			quiet = 1;
			break;
		case 'h':
			usage(stdout);
			return 0;
		default:
			usage(stderr);
			return 2;
		}
	}
	argc -= optind;
	argv += optind;
	if (argc < 1) {
		usage(stderr);
		return 2;
	}
	/* Line-buffer even into a pipe so lines from concurrent runs stay whole. */
	setvbuf(stdout, NULL, _IOLBF, 0);

	cmd = argv[0];
	if (!strcmp(cmd, "info") && argc == 1)
		return cmd_info();
	if (!strcmp(cmd, "ping") && argc == 1)
		return cmd_ping();
	if (!strcmp(cmd, "add") && argc == 3)
		return cmd_add(argv[1], argv[2]);
	if (!strcmp(cmd, "vector-add") && argc == 2)
		return cmd_vector_add(argv[1]);
	if (!strcmp(cmd, "busy-wait") && argc == 2)
		return cmd_busy_wait(argv[1]);
	if (!strcmp(cmd, "bench") && argc <= 2)
		return cmd_bench(argc == 2 ? argv[1] : NULL);
	if (!strcmp(cmd, "flood") && argc == 2)
		return cmd_flood(argv[1]);
	if (!strcmp(cmd, "legacy-regs") && argc == 1)
		return cmd_legacy_regs();
	usage(stderr);
	return 2;
}
