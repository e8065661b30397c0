// SPDX-License-Identifier: GPL-2.0
/*
 * uf_state_bench - cost of the KVM userfault USERFAULT memory attribute.
 *
 * Standalone (raw ioctls on /dev/kvm, no selftest library), for comparing
 * the userfault series' v1 and v2 kernels.  No vCPU is created and guest
 * memory is never touched: everything measured is KVM's own bookkeeping of
 * the USERFAULT state of one large memslot.
 *
 *  1. memory: /proc/meminfo deltas of creating the memslot and of one
 *     KVM_SET_MEMORY_ATTRIBUTES(USERFAULT, FLAG_SET) over the whole slot,
 *     on a fresh VM per repetition;
 *  2. time: that SET, and the CLEAR back, over the whole slot;
 *  3. resolve: with the whole slot USERFAULT and a userfault fd open, T
 *     threads (started by a barrier) each KVM_USERFAULT_RESOLVE N distinct
 *     single pages (disjoint, spread over the slot); one warm-up pass, then
 *     -k measured passes on other pages, medians reported; USERFAULT is set
 *     again over the whole slot before each T.  Then one resolve of the
 *     whole slot.
 *
 * /proc/meminfo is read after sync, drop_caches and vm/stat_refresh, until
 * it is stable; the per-CPU free lists (/proc/zoneinfo) are added to
 * MemFree, which otherwise misses pages moving between them and the buddy
 * allocator.
 *
 * Works with both uAPIs of KVM_CREATE_USERFAULT_FD: v2 (_IOWR, msg_size) is
 * tried first, v1 (_IOW, flags + reserved[7]) on ENOTTY.
 *
 * Build:
 *   gcc -O2 -static -Wall -Wextra -o uf_state_bench uf_state_bench.c \
 *       -I<kernel build>/usr/include
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/utsname.h>

#include <linux/kvm.h>

#define PAGE_SIZE	4096ULL
#define KIB		1024ULL
#define MIB		(1024ULL * KIB)
#define GIB		(1024ULL * MIB)
#define TIB		(1024ULL * GIB)

#define SLOT_ID		0
#define MAX_THREADS	64
#define MAX_TCOUNTS	16
#define MAX_REPS	64

/* The v1 uAPI of KVM_CREATE_USERFAULT_FD: same size, _IOW, no msg_size. */
struct kvm_create_userfault_fd_v1 {
	__u64 flags;
	__u64 reserved[7];
};

#define KVM_CREATE_USERFAULT_FD_V1 \
	_IOW(KVMIO, 0xd6, struct kvm_create_userfault_fd_v1)
#define KVM_CREATE_USERFAULT_FD_V2 KVM_CREATE_USERFAULT_FD

_Static_assert(sizeof(struct kvm_create_userfault_fd_v1) ==
	       sizeof(struct kvm_create_userfault_fd), "uAPI size");
_Static_assert(KVM_CREATE_USERFAULT_FD_V1 != KVM_CREATE_USERFAULT_FD_V2,
	       "v1 and v2 ioctl numbers");

/* The record size this program understands (v2 negotiation). */
#define UF_MSG_SIZE	24

enum uf_abi { ABI_UNKNOWN, ABI_V1, ABI_V2 };

static struct {
	uint64_t size;		/* memslot size, bytes */
	uint64_t gpa;		/* memslot base gpa */
	int mem_reps;
	int time_reps;
	int resolve_reps;
	unsigned long pages_per_thread;
	int tcounts[MAX_TCOUNTS];
	int nr_tcounts;
	bool skip_mem, skip_time, skip_resolve;
} opt = {
	.size = 64 * GIB,
	.gpa = 4 * GIB,
	.mem_reps = 3,
	.time_reps = 3,
	.resolve_reps = 5,
	.pages_per_thread = 20000,
	.tcounts = { 1, 2, 4 },
	.nr_tcounts = 3,
};

static int kvm_fd = -1;
static enum uf_abi abi = ABI_UNKNOWN;
static bool drop_caches_ok = true;
static bool stat_refresh_ok = true;

static void __attribute__((noreturn, format(printf, 1, 2)))
die(const char *fmt, ...)
{
	int err = errno;
	va_list ap;

	fflush(stdout);
	fprintf(stderr, "uf_state_bench: FAIL: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, ": errno=%d (%s)\n", err, strerror(err));
	exit(1);
}

static void __attribute__((noreturn, format(printf, 1, 2)))
usage_die(const char *fmt, ...)
{
	va_list ap;

	fprintf(stderr, "uf_state_bench: ");
	va_start(ap, fmt);
	vfprintf(stderr, fmt, ap);
	va_end(ap);
	fprintf(stderr, "\n");
	exit(2);
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_MONOTONIC, &ts))
		die("clock_gettime(CLOCK_MONOTONIC)");
	return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static double ns_to_s(uint64_t ns)
{
	return ns / 1e9;
}

/* ---- /proc/meminfo ---- */

enum mi_field {
	MI_MEMFREE,
	MI_SLAB,
	MI_SUNRECLAIM,
	MI_VMALLOC,
	MI_KSTACK,
	MI_PAGETABLES,
	MI_NR_MEMINFO,
	/* MemFree plus the pages on the per-CPU free lists (/proc/zoneinfo). */
	MI_FREE_PCP = MI_NR_MEMINFO,
	MI_NR,
};

static const char *const mi_name[MI_NR] = {
	[MI_MEMFREE]	= "MemFree",
	[MI_SLAB]	= "Slab",
	[MI_SUNRECLAIM]	= "SUnreclaim",
	[MI_VMALLOC]	= "VmallocUsed",
	[MI_KSTACK]	= "KernelStack",
	[MI_PAGETABLES]	= "PageTables",
	[MI_FREE_PCP]	= "MemFree+pcp",
};

/* Short key names for the output. */
static const char *const mi_key[MI_NR] = {
	[MI_MEMFREE]	= "memfree",
	[MI_SLAB]	= "slab",
	[MI_SUNRECLAIM]	= "sunreclaim",
	[MI_VMALLOC]	= "vmalloc",
	[MI_KSTACK]	= "kstack",
	[MI_PAGETABLES]	= "pagetables",
	[MI_FREE_PCP]	= "memfree_pcp",
};

struct meminfo {
	long kb[MI_NR];
};

/* Pages on the per-CPU free lists: the "count:" lines of the pagesets. */
static long read_pcp_kb(void)
{
	char line[256];
	long val, pages = 0;
	FILE *f;

	f = fopen("/proc/zoneinfo", "r");
	if (!f)
		die("open /proc/zoneinfo");
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, " count: %ld", &val) == 1)
			pages += val;
	}
	fclose(f);
	return pages * (long)(PAGE_SIZE / KIB);
}

static void read_meminfo(struct meminfo *m)
{
	char line[256], name[64];
	unsigned int seen = 0;
	long val;
	FILE *f;
	int i;

	f = fopen("/proc/meminfo", "r");
	if (!f)
		die("open /proc/meminfo");
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%63[^:]: %ld", name, &val) != 2)
			continue;
		for (i = 0; i < MI_NR_MEMINFO; i++) {
			if (!strcmp(name, mi_name[i])) {
				m->kb[i] = val;
				seen |= 1U << i;
			}
		}
	}
	fclose(f);
	for (i = 0; i < MI_NR_MEMINFO; i++) {
		if (!(seen & (1U << i))) {
			errno = ENOENT;
			die("/proc/meminfo has no %s", mi_name[i]);
		}
	}
	m->kb[MI_FREE_PCP] = m->kb[MI_MEMFREE] + read_pcp_kb();
}

static bool write_sysctl(const char *path, const char *val)
{
	ssize_t len = strlen(val);
	bool ok;
	int fd;

	fd = open(path, O_WRONLY);
	if (fd < 0)
		return false;
	ok = write(fd, val, len) == len;
	close(fd);
	return ok;
}

/*
 * Drop the page cache and reclaimable slab, and fold the per-CPU vmstat
 * differentials into the global counters that /proc/meminfo shows
 * (stat_refresh).  Writing 4 first silences drop_caches' console message.
 */
static void drop_caches(void)
{
	static bool quiet;

	sync();
	if (!quiet) {
		write_sysctl("/proc/sys/vm/drop_caches", "4\n");
		quiet = true;
	}
	if (drop_caches_ok && !write_sysctl("/proc/sys/vm/drop_caches", "3\n")) {
		fprintf(stderr,
			"uf_state_bench: warning: cannot drop caches (%s); meminfo may be noisier\n",
			strerror(errno));
		drop_caches_ok = false;
	}
	if (stat_refresh_ok && !write_sysctl("/proc/sys/vm/stat_refresh", "1\n")) {
		fprintf(stderr,
			"uf_state_bench: warning: cannot write vm/stat_refresh (%s); meminfo may be noisier\n",
			strerror(errno));
		stat_refresh_ok = false;
	}
}

static bool meminfo_close(const struct meminfo *a, const struct meminfo *b)
{
	int i;

	/* Within two pages on every field. */
	for (i = 0; i < MI_NR; i++) {
		if (labs(a->kb[i] - b->kb[i]) > 8)
			return false;
	}
	return true;
}

/*
 * Sync, drop caches, then read until SETTLE_READS consecutive reads
 * SETTLE_US apart agree (RCU-deferred frees of a destroyed VM, per-CPU page
 * lists refilling), for at most SETTLE_MAX_US.
 */
#define SETTLE_US	50000
#define SETTLE_READS	4
#define SETTLE_MAX_US	20000000

static void read_meminfo_settled(struct meminfo *m)
{
	struct meminfo prev;
	int i, same = 0;

	drop_caches();
	read_meminfo(&prev);
	for (i = 0; i < SETTLE_MAX_US / SETTLE_US; i++) {
		usleep(SETTLE_US);
		drop_caches();
		read_meminfo(m);
		if (!meminfo_close(&prev, m))
			same = 0;
		else if (++same == SETTLE_READS - 1)
			return;
		prev = *m;
	}
	fprintf(stderr, "uf_state_bench: warning: /proc/meminfo did not settle in %d s\n",
		SETTLE_MAX_US / 1000000);
}

/* Kernel memory consumed from @a to @b: MemFree falls, the others grow. */
static long mi_used(const struct meminfo *a, const struct meminfo *b, int i)
{
	if (i == MI_MEMFREE || i == MI_FREE_PCP)
		return a->kb[i] - b->kb[i];
	return b->kb[i] - a->kb[i];
}

static double kb_to_mib_per_tib(long kb)
{
	return (double)kb / 1024.0 * ((double)TIB / (double)opt.size);
}

static void print_mi_deltas(const char *prefix, const struct meminfo *a,
			    const struct meminfo *b)
{
	int i;

	for (i = 0; i < MI_NR; i++)
		printf(" %s_%s_kB=%ld", prefix, mi_key[i], mi_used(a, b, i));
}

/* ---- KVM ---- */

struct vm {
	int fd;
	int uffd;
	void *mem;
	bool has_slot;
};

static void vm_create(struct vm *vm)
{
	vm->fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
	if (vm->fd < 0)
		die("KVM_CREATE_VM(type 0)");
	vm->uffd = -1;
	vm->mem = NULL;
	vm->has_slot = false;
}

static void vm_map(struct vm *vm)
{
	vm->mem = mmap(NULL, opt.size, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
	if (vm->mem == MAP_FAILED)
		die("mmap of %" PRIu64 " bytes (anonymous, MAP_NORESERVE)",
		    opt.size);
}

static void vm_add_slot(struct vm *vm)
{
	struct kvm_userspace_memory_region r = {
		.slot = SLOT_ID,
		.flags = 0,
		.guest_phys_addr = opt.gpa,
		.memory_size = opt.size,
		.userspace_addr = (uintptr_t)vm->mem,
	};

	if (ioctl(vm->fd, KVM_SET_USER_MEMORY_REGION, &r))
		die("KVM_SET_USER_MEMORY_REGION(slot %d, gpa 0x%" PRIx64
		    ", size 0x%" PRIx64 ")", SLOT_ID, opt.gpa, opt.size);
	vm->has_slot = true;
}

static void vm_setup(struct vm *vm)
{
	vm_create(vm);
	vm_map(vm);
	vm_add_slot(vm);
}

static void vm_destroy(struct vm *vm)
{
	/* A v1 userfault fd holds a VM reference: close it first. */
	if (vm->uffd >= 0 && close(vm->uffd))
		die("close(userfault fd)");
	if (close(vm->fd))
		die("close(VM fd)");
	if (vm->mem && munmap(vm->mem, opt.size))
		die("munmap of guest memory");
	vm->uffd = -1;
	vm->fd = -1;
	vm->mem = NULL;
}

static uint64_t set_attrs(struct vm *vm, uint64_t gpa, uint64_t size,
			  uint64_t flags, const char *what)
{
	struct kvm_memory_attributes a = {
		.address = gpa,
		.size = size,
		.attributes = KVM_MEMORY_ATTRIBUTE_USERFAULT,
		.flags = flags,
	};
	uint64_t t0 = now_ns();

	if (ioctl(vm->fd, KVM_SET_MEMORY_ATTRIBUTES, &a))
		die("%s: KVM_SET_MEMORY_ATTRIBUTES(USERFAULT, flags 0x%" PRIx64
		    ", gpa 0x%" PRIx64 ", size 0x%" PRIx64 ")",
		    what, flags, gpa, size);
	return now_ns() - t0;
}

static uint64_t set_userfault_all(struct vm *vm, const char *what)
{
	return set_attrs(vm, opt.gpa, opt.size, KVM_MEMORY_ATTRIBUTES_FLAG_SET,
			 what);
}

static uint64_t clear_userfault_all(struct vm *vm, const char *what)
{
	return set_attrs(vm, opt.gpa, opt.size,
			 KVM_MEMORY_ATTRIBUTES_FLAG_CLEAR, what);
}

/*
 * Create the VM's userfault fd; the first call finds out which uAPI the
 * kernel has.  Returns the record size (v2) or 0 (v1).
 */
static unsigned int vm_create_uffd(struct vm *vm)
{
	struct kvm_create_userfault_fd v2 = {
		.flags = 0,
		.msg_size = UF_MSG_SIZE,
	};
	struct kvm_create_userfault_fd_v1 v1 = { .flags = 0 };
	int fd;

	if (abi != ABI_V1) {
		fd = ioctl(vm->fd, KVM_CREATE_USERFAULT_FD_V2, &v2);
		if (fd >= 0) {
			abi = ABI_V2;
			vm->uffd = fd;
			if (v2.msg_size != UF_MSG_SIZE) {
				errno = EPROTO;
				die("KVM_CREATE_USERFAULT_FD (v2): msg_size %u, asked %u",
				    v2.msg_size, UF_MSG_SIZE);
			}
			return v2.msg_size;
		}
		if (abi == ABI_V2 || errno != ENOTTY)
			die("KVM_CREATE_USERFAULT_FD (v2 uAPI, _IOWR, msg_size %u)",
			    UF_MSG_SIZE);
	}

	fd = ioctl(vm->fd, KVM_CREATE_USERFAULT_FD_V1, &v1);
	if (fd < 0)
		die("KVM_CREATE_USERFAULT_FD (v1 uAPI, _IOW; v2 gave ENOTTY)");
	abi = ABI_V1;
	vm->uffd = fd;
	return 0;
}

static void resolve(int uffd, uint64_t gpa, uint64_t size)
{
	struct kvm_userfault_range r = { .gpa = gpa, .size = size };

	if (ioctl(uffd, KVM_USERFAULT_RESOLVE, &r))
		die("KVM_USERFAULT_RESOLVE(gpa 0x%" PRIx64 ", size 0x%" PRIx64 ")",
		    gpa, size);
}

/* ---- header: kernel, capabilities, ABI ---- */

static const char *abi_name(void)
{
	return abi == ABI_V2 ? "v2" : abi == ABI_V1 ? "v1" : "unknown";
}

static void probe(void)
{
	unsigned int msg_size;
	struct utsname u;
	int cap_uf, cap_fd_flags, cap_attrs;
	struct vm vm;

	if (uname(&u))
		die("uname");

	kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
	if (kvm_fd < 0)
		die("open /dev/kvm");

	vm_create(&vm);
	cap_attrs = ioctl(vm.fd, KVM_CHECK_EXTENSION, KVM_CAP_MEMORY_ATTRIBUTES);
	if (cap_attrs < 0)
		die("KVM_CHECK_EXTENSION(KVM_CAP_MEMORY_ATTRIBUTES)");
	if (!(cap_attrs & KVM_MEMORY_ATTRIBUTE_USERFAULT)) {
		errno = EOPNOTSUPP;
		die("KVM_CAP_MEMORY_ATTRIBUTES = 0x%x has no USERFAULT (1<<4)",
		    cap_attrs);
	}
	cap_uf = ioctl(vm.fd, KVM_CHECK_EXTENSION, KVM_CAP_USERFAULT);
	if (cap_uf < 0)
		die("KVM_CHECK_EXTENSION(KVM_CAP_USERFAULT)");
	if (!cap_uf) {
		errno = EOPNOTSUPP;
		die("KVM_CAP_USERFAULT is 0 on a type-0 VM");
	}
	cap_fd_flags = ioctl(vm.fd, KVM_CHECK_EXTENSION,
			     KVM_CAP_USERFAULT_FD_FLAGS);
	if (cap_fd_flags < 0)
		die("KVM_CHECK_EXTENSION(KVM_CAP_USERFAULT_FD_FLAGS)");
	msg_size = vm_create_uffd(&vm);
	vm_destroy(&vm);
	drop_caches();	/* find out early whether it works */

	printf("kernel release=%s version=\"%s\" machine=%s ncpus=%ld",
	       u.release, u.version, u.machine, sysconf(_SC_NPROCESSORS_ONLN));
	printf(" abi=%s cap_userfault=0x%x cap_userfault_fd_flags=0x%x",
	       abi_name(), cap_uf, cap_fd_flags);
	printf(" cap_memory_attributes=0x%x msg_size=%u", cap_attrs, msg_size);
	printf(" | kernel %s, userfault uAPI %s\n", u.release,
	       abi == ABI_V2 ? "v2 (_IOWR create, msg_size negotiated)" :
			       "v1 (_IOW create, fixed records)");

	printf("config size_bytes=%" PRIu64 " size_gib=%.3f gpa=0x%" PRIx64,
	       opt.size, (double)opt.size / GIB, opt.gpa);
	printf(" pages=%" PRIu64 " mem_reps=%d time_reps=%d resolve_passes=%d",
	       (uint64_t)(opt.size / PAGE_SIZE), opt.mem_reps, opt.time_reps,
	       opt.resolve_reps);
	printf(" pages_per_thread=%lu drop_caches=%d stat_refresh=%d\n",
	       opt.pages_per_thread, drop_caches_ok, stat_refresh_ok);
	fflush(stdout);
}

/* ---- 1. memory ---- */

static void bench_memory(int rep)
{
	long set_kb, set_raw_kb, set_slab, set_vmalloc, set_other, leak_kb;
	struct meminfo m0, m1, m2, m3, m4;
	uint64_t set_ns;
	struct vm vm;

	read_meminfo_settled(&m0);
	vm_create(&vm);
	vm_map(&vm);
	read_meminfo_settled(&m1);
	vm_add_slot(&vm);
	read_meminfo_settled(&m2);
	set_ns = set_userfault_all(&vm, "memory: SET over the slot");
	read_meminfo_settled(&m3);
	vm_destroy(&vm);
	read_meminfo_settled(&m4);

	/*
	 * The total is the fall in free memory.  Raw MemFree misses pages
	 * that move between the buddy allocator and the per-CPU free lists
	 * (those hold up to order-9 pages), so MemFree + pcp is the total
	 * used; raw MemFree is printed beside it.
	 */
	set_kb = mi_used(&m2, &m3, MI_FREE_PCP);
	set_raw_kb = mi_used(&m2, &m3, MI_MEMFREE);
	set_slab = mi_used(&m2, &m3, MI_SLAB);
	set_vmalloc = mi_used(&m2, &m3, MI_VMALLOC);
	/* Neither slab nor vmalloc nor page tables nor stacks. */
	set_other = set_kb - set_slab - set_vmalloc -
		    mi_used(&m2, &m3, MI_PAGETABLES) -
		    mi_used(&m2, &m3, MI_KSTACK);
	leak_kb = mi_used(&m0, &m4, MI_FREE_PCP);

	printf("mem rep=%d", rep);
	print_mi_deltas("vm", &m0, &m1);
	print_mi_deltas("slot", &m1, &m2);
	print_mi_deltas("set", &m2, &m3);
	printf(" set_other_kB=%ld", set_other);
	printf(" set_mib_per_tib=%.2f set_memfree_raw_mib_per_tib=%.2f",
	       kb_to_mib_per_tib(set_kb), kb_to_mib_per_tib(set_raw_kb));
	printf(" set_slab_mib_per_tib=%.2f", kb_to_mib_per_tib(set_slab));
	printf(" set_vmalloc_mib_per_tib=%.2f",
	       kb_to_mib_per_tib(set_vmalloc));
	printf(" retained_after_destroy_kB=%ld set_s=%.6f", leak_kb,
	       ns_to_s(set_ns));
	printf(" | rep %d: memslot %ld kB; SET USERFAULT over %.0f GiB: %ld kB",
	       rep, mi_used(&m1, &m2, MI_FREE_PCP), (double)opt.size / GIB,
	       set_kb);
	printf(" = %.1f MiB/TiB (slab %ld kB, vmalloc %ld kB, other %ld kB;",
	       kb_to_mib_per_tib(set_kb), set_slab, set_vmalloc, set_other);
	printf(" raw MemFree %ld kB = %.1f MiB/TiB);", set_raw_kb,
	       kb_to_mib_per_tib(set_raw_kb));
	printf(" retained after VM destroy %ld kB\n", leak_kb);
	fflush(stdout);
}

/* ---- 2. time of SET and CLEAR ---- */

static void bench_time(int rep)
{
	uint64_t set_ns, clear_ns, set2_ns;
	struct vm vm;

	vm_setup(&vm);
	set_ns = set_userfault_all(&vm, "time: first SET");
	clear_ns = clear_userfault_all(&vm, "time: CLEAR");
	set2_ns = set_userfault_all(&vm, "time: SET after CLEAR");
	vm_destroy(&vm);

	printf("time rep=%d size_gib=%.3f set_s=%.6f clear_s=%.6f",
	       rep, (double)opt.size / GIB, ns_to_s(set_ns), ns_to_s(clear_ns));
	printf(" set_again_s=%.6f", ns_to_s(set2_ns));
	printf(" | rep %d, fresh VM, whole %.0f GiB slot: SET %.3f s, CLEAR %.3f s,",
	       rep, (double)opt.size / GIB, ns_to_s(set_ns), ns_to_s(clear_ns));
	printf(" SET again %.3f s\n", ns_to_s(set2_ns));
	fflush(stdout);
}

/* ---- 3. resolve ---- */

struct worker {
	pthread_t tid;
	int idx;
	int uffd;
	uint64_t first_gpa;
	uint64_t stride;	/* bytes between two resolved pages */
	unsigned long n;
	pthread_barrier_t *barrier;
	uint64_t start_ns, end_ns;
	uint64_t cpu_ns;	/* thread CPU time of the loop */
	int err;		/* errno of the failed call, 0 if none */
	unsigned long failed_at;
};

static uint64_t thread_cpu_ns(void)
{
	struct timespec ts;

	if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts))
		die("clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
	return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

static void *worker_fn(void *arg)
{
	struct worker *w = arg;
	struct kvm_userfault_range r = { .size = PAGE_SIZE };
	uint64_t cpu0;
	unsigned long i;
	int ret;

	ret = pthread_barrier_wait(w->barrier);
	if (ret && ret != PTHREAD_BARRIER_SERIAL_THREAD) {
		w->err = ret;
		w->failed_at = 0;
		return NULL;
	}

	cpu0 = thread_cpu_ns();
	w->start_ns = now_ns();
	for (i = 0; i < w->n; i++) {
		r.gpa = w->first_gpa + i * w->stride;
		if (ioctl(w->uffd, KVM_USERFAULT_RESOLVE, &r)) {
			w->err = errno;
			w->failed_at = i;
			break;
		}
	}
	w->end_ns = now_ns();
	w->cpu_ns = thread_cpu_ns() - cpu0;
	return NULL;
}

struct resolve_result {
	double mean_ns;		/* mean over threads of per-call time */
	double max_thread_ns;	/* slowest thread's per-call time */
	double cpu_ns;		/* mean per-call CPU time of the threads */
	double per_s;		/* total resolves / wall time */
	uint64_t wall_ns;
};

/* Pages between two resolved pages of one thread. */
static uint64_t resolve_stride(int nthreads)
{
	return opt.size / PAGE_SIZE / nthreads / opt.pages_per_thread;
}

/*
 * @nthreads threads, thread i resolving the pages
 * i * npages / nthreads + @offset + j * stride, j < pages_per_thread:
 * disjoint ranges, spread over the slot; each @offset (< stride) is a
 * different set of pages.
 */
static void run_resolvers(struct vm *vm, int nthreads, uint64_t offset,
			  struct resolve_result *res)
{
	struct worker w[MAX_THREADS];
	uint64_t npages = opt.size / PAGE_SIZE;
	uint64_t per_thread = npages / nthreads;
	uint64_t stride = resolve_stride(nthreads);
	uint64_t t_first = UINT64_MAX, t_last = 0;
	pthread_barrier_t barrier;
	double sum = 0, max = 0, cpu_sum = 0;
	int i, ret;

	if (offset >= stride) {
		errno = EINVAL;
		die("resolve: %d threads x %lu pages x %" PRIu64
		    " passes do not fit in %" PRIu64 " pages",
		    nthreads, opt.pages_per_thread, offset + 1, npages);
	}

	ret = pthread_barrier_init(&barrier, NULL, nthreads);
	if (ret) {
		errno = ret;
		die("pthread_barrier_init");
	}
	for (i = 0; i < nthreads; i++) {
		w[i] = (struct worker) {
			.idx = i,
			.uffd = vm->uffd,
			.first_gpa = opt.gpa +
				     (i * per_thread + offset) * PAGE_SIZE,
			.stride = stride * PAGE_SIZE,
			.n = opt.pages_per_thread,
			.barrier = &barrier,
		};
		ret = pthread_create(&w[i].tid, NULL, worker_fn, &w[i]);
		if (ret) {
			errno = ret;
			die("pthread_create (resolver %d of %d)", i, nthreads);
		}
	}
	for (i = 0; i < nthreads; i++) {
		ret = pthread_join(w[i].tid, NULL);
		if (ret) {
			errno = ret;
			die("pthread_join (resolver %d)", i);
		}
	}
	pthread_barrier_destroy(&barrier);

	for (i = 0; i < nthreads; i++) {
		double per_call;

		if (w[i].err) {
			errno = w[i].err;
			die("resolve: thread %d of %d, call %lu: KVM_USERFAULT_RESOLVE(gpa 0x%"
			    PRIx64 ", 4 KiB)", i, nthreads, w[i].failed_at,
			    w[i].first_gpa + w[i].failed_at * w[i].stride);
		}
		per_call = (double)(w[i].end_ns - w[i].start_ns) / w[i].n;
		sum += per_call;
		cpu_sum += (double)w[i].cpu_ns / w[i].n;
		if (per_call > max)
			max = per_call;
		if (w[i].start_ns < t_first)
			t_first = w[i].start_ns;
		if (w[i].end_ns > t_last)
			t_last = w[i].end_ns;
	}
	res->mean_ns = sum / nthreads;
	res->max_thread_ns = max;
	res->cpu_ns = cpu_sum / nthreads;
	res->wall_ns = t_last - t_first;
	res->per_s = (double)nthreads * opt.pages_per_thread /
		     ns_to_s(res->wall_ns);
}

static int cmp_double(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;

	return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
	qsort(v, n, sizeof(*v), cmp_double);
	return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

static void bench_resolve(void)
{
	double mean[MAX_REPS], cpu[MAX_REPS], per_s[MAX_REPS];
	double base_ns = 0, base_cpu_ns = 0;
	uint64_t set_ns, ns;
	struct vm vm;
	int k, r;

	vm_setup(&vm);
	vm_create_uffd(&vm);

	for (k = 0; k < opt.nr_tcounts; k++) {
		double ratio, cpu_ratio, m_mean, m_cpu, m_per_s, lo, hi;
		int t = opt.tcounts[k];
		struct resolve_result res;

		set_ns = set_userfault_all(&vm, "resolve: SET before a run");

		/* Pass 0 warms up (code paths, TCG translations): not counted. */
		for (r = 0; r <= opt.resolve_reps; r++) {
			run_resolvers(&vm, t, r, &res);
			printf("resolve_pass threads=%d pass=%d%s mean_ns=%.0f",
			       t, r, r ? "" : " warmup=1", res.mean_ns);
			printf(" max_thread_ns=%.0f cpu_ns=%.0f wall_s=%.6f",
			       res.max_thread_ns, res.cpu_ns,
			       ns_to_s(res.wall_ns));
			printf(" resolves_per_s=%.0f\n", res.per_s);
			if (!r)
				continue;
			mean[r - 1] = res.mean_ns;
			cpu[r - 1] = res.cpu_ns;
			per_s[r - 1] = res.per_s;
		}
		m_mean = median(mean, opt.resolve_reps);
		lo = mean[0];
		hi = mean[opt.resolve_reps - 1];
		m_cpu = median(cpu, opt.resolve_reps);
		m_per_s = median(per_s, opt.resolve_reps);
		if (t == 1) {
			base_ns = m_mean;
			base_cpu_ns = m_cpu;
		}
		ratio = base_ns ? m_mean / base_ns : NAN;
		cpu_ratio = base_cpu_ns ? m_cpu / base_cpu_ns : NAN;

		printf("resolve threads=%d calls_per_thread=%lu passes=%d", t,
		       opt.pages_per_thread, opt.resolve_reps);
		printf(" stride_pages=%" PRIu64 " mean_ns=%.0f min_ns=%.0f max_ns=%.0f",
		       resolve_stride(t), m_mean, lo, hi);
		printf(" cpu_ns=%.0f resolves_per_s=%.0f", m_cpu, m_per_s);
		printf(" ratio_vs_1=%.3f cpu_ratio_vs_1=%.3f", ratio, cpu_ratio);
		printf(" preceding_set_s=%.6f", ns_to_s(set_ns));
		printf(" | %d thread%s x %lu single-page resolves (median of %d):",
		       t, t == 1 ? "" : "s", opt.pages_per_thread,
		       opt.resolve_reps);
		printf(" %.0f ns/call, %.0f resolves/s, %.2fx the 1-thread cost",
		       m_mean, m_per_s, ratio);
		printf(" per call (CPU %.0f ns/call)\n", m_cpu);
		fflush(stdout);
	}

	set_ns = set_userfault_all(&vm, "resolve: SET before the whole slot");
	ns = now_ns();
	resolve(vm.uffd, opt.gpa, opt.size);
	ns = now_ns() - ns;
	printf("resolve_whole size_gib=%.3f sec=%.6f preceding_set_s=%.6f",
	       (double)opt.size / GIB, ns_to_s(ns), ns_to_s(set_ns));
	printf(" | one KVM_USERFAULT_RESOLVE of the whole %.0f GiB slot: %.3f s\n",
	       (double)opt.size / GIB, ns_to_s(ns));
	fflush(stdout);

	ns = now_ns();
	vm_destroy(&vm);
	printf("resolve_teardown destroy_s=%.6f\n", ns_to_s(now_ns() - ns));
	fflush(stdout);
}

/* ---- options ---- */

static uint64_t parse_size(const char *s)
{
	char *end;
	uint64_t v;

	errno = 0;
	v = strtoull(s, &end, 0);
	if (errno || end == s)
		usage_die("bad size '%s'", s);
	switch (*end) {
	case 'T': case 't':
		v *= TIB; end++; break;
	case 'G': case 'g':
		v *= GIB; end++; break;
	case 'M': case 'm':
		v *= MIB; end++; break;
	case 'K': case 'k':
		v *= KIB; end++; break;
	default:
		break;
	}
	if (*end == 'i' || *end == 'B' || *end == 'b')
		end++;
	if (*end == 'B')
		end++;
	if (*end || !v || v % PAGE_SIZE)
		usage_die("bad size '%s' (need a non-zero multiple of 4 KiB)", s);
	return v;
}

static void parse_tcounts(const char *s)
{
	char *copy = strdup(s), *tok, *save = NULL;

	if (!copy)
		die("strdup");
	opt.nr_tcounts = 0;
	for (tok = strtok_r(copy, ",", &save); tok;
	     tok = strtok_r(NULL, ",", &save)) {
		int t = atoi(tok);

		if (t < 1 || t > MAX_THREADS || opt.nr_tcounts == MAX_TCOUNTS)
			usage_die("bad thread count list '%s' (1..%d, at most %d)",
				  s, MAX_THREADS, MAX_TCOUNTS);
		opt.tcounts[opt.nr_tcounts++] = t;
	}
	free(copy);
	if (!opt.nr_tcounts)
		usage_die("empty thread count list");
}

static void usage(const char *argv0)
{
	printf("usage: %s [-s SIZE] [-g GPA] [-r MEM_REPS] [-n TIME_REPS] [-k PASSES]\n"
	       "       [-t T1,T2,..] [-N PAGES] [-M] [-T] [-R]\n"
	       "  -s SIZE    memslot size (default 64G; K/M/G/T suffixes)\n"
	       "  -g GPA     memslot gpa, 1 GiB aligned (default 4G)\n"
	       "  -r N       memory measurement repetitions, fresh VM each (default 3)\n"
	       "  -n N       SET/CLEAR timing repetitions, fresh VM each (default 3)\n"
	       "  -k N       measured resolve passes per thread count, after one\n"
	       "             warm-up pass, each on other pages (default 5)\n"
	       "  -t LIST    resolver thread counts (default 1,2,4)\n"
	       "  -N PAGES   single-page resolves per thread (default 20000)\n"
	       "  -M/-T/-R   skip the memory / time / resolve measurement\n",
	       argv0);
}

int main(int argc, char **argv)
{
	int c, i;

	while ((c = getopt(argc, argv, "s:g:r:n:k:t:N:MTRh")) != -1) {
		switch (c) {
		case 's':
			opt.size = parse_size(optarg);
			break;
		case 'g':
			opt.gpa = parse_size(optarg);
			if (opt.gpa % GIB)
				usage_die("-g %s: gpa must be 1 GiB aligned", optarg);
			break;
		case 'r':
			opt.mem_reps = atoi(optarg);
			break;
		case 'n':
			opt.time_reps = atoi(optarg);
			break;
		case 'k':
			opt.resolve_reps = atoi(optarg);
			if (opt.resolve_reps < 1 || opt.resolve_reps > MAX_REPS)
				usage_die("-k %s: 1..%d passes", optarg, MAX_REPS);
			break;
		case 't':
			parse_tcounts(optarg);
			break;
		case 'N':
			opt.pages_per_thread = strtoul(optarg, NULL, 0);
			if (!opt.pages_per_thread)
				usage_die("-N %s: need at least one page", optarg);
			break;
		case 'M':
			opt.skip_mem = true;
			break;
		case 'T':
			opt.skip_time = true;
			break;
		case 'R':
			opt.skip_resolve = true;
			break;
		case 'h':
			usage(argv[0]);
			return 0;
		default:
			usage(argv[0]);
			return 2;
		}
	}
	if (opt.mem_reps < 0 || opt.time_reps < 0)
		usage_die("repetition counts must be >= 0");

	setvbuf(stdout, NULL, _IOLBF, 0);
	probe();

	if (!opt.skip_mem)
		for (i = 1; i <= opt.mem_reps; i++)
			bench_memory(i);
	if (!opt.skip_time)
		for (i = 1; i <= opt.time_reps; i++)
			bench_time(i);
	if (!opt.skip_resolve)
		bench_resolve();

	printf("done abi=%s\n", abi_name());
	return 0;
}
