//go:build ignore

// duet capture: tracepoint programs that report which byte ranges and which
// inodes changed on the watched filesystems. Records are coalesced in the
// kernel per 1 MiB chunk so that sequential writes cost a few records per
// chunk, while isolated small writes still report their exact bytes.
//
// Every record is emitted after the change is visible to a reader (write_end,
// dio completion, mark_inode_dirty), except the page-fault path (mmap) and
// the pre-op hooks (punch/zero/collapse/insert), which userspace handles as
// described in docs/CAPTURE.md.

#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

// A pointer taken for a kernel type: its fields are then read with direct
// (fault-handled) loads, not a helper call each as BPF_CORE_READ makes
// them. vmlinux types only: the ID of a module's type (btrfs is a module
// on most distributions' kernels) is one the verifier looks up in
// vmlinux's BTF, where it is not.
extern void *bpf_rdonly_cast(const void *obj__ign, __u32 btf_id) __ksym;
#define CAST(ptr, type) ((type *)bpf_rdonly_cast((void *)(ptr), bpf_core_type_id_kernel(type)))

char LICENSE[] SEC("license") = "Dual BSD/GPL";

// A chunk is the unit of a mark (see data()). 1 MiB: a sequential writer
// of 64 KiB blocks finds most of its writes inside the extent its earlier
// ones announced (a lookup, no record), where 64 KiB chunks cost a map
// insert and a record for every block. A mark's extent is kept in 16-byte
// units (MARK_SHIFT), so that it fits the 16-bit halves of the mark,
// rounded in: a mark never claims a byte its record does not cover, and
// records carry the exact bytes (rounded out, a short file's record went
// past its end, and the pass retried it as bytes beyond EOF for 2 s).
#define CHUNK_SHIFT 20
#define CHUNK_SIZE (1ULL << CHUNK_SHIFT)
#define MARK_SHIFT (CHUNK_SHIFT - 16)
#define MARK_UNIT (1ULL << MARK_SHIFT)
#define MAX_CHUNKS_PER_EVENT 8 // a 2 MiB large folio spans 2 chunks
#define AHEAD_PAST_EOF (64ULL << 10)
#define PAGE_SHIFT_4K 12
#define SUPPRESS_WINDOW_NS 5000000 // 5 ms: a task preempted in write_end

// Set by userspace to an eighth of the ring before loading.
volatile const __u64 RING_WAKE_BYTES = 2 << 20;

// Set by userspace while durability calls wait on the barrier: every record
// then wakes the reader, so that it is read while the writer moves on to
// its fsync, not when the barrier asks for it.
volatile __u32 EAGER_WAKE = 0;

enum kind {
	KIND_DATA = 1,    // bytes [pos, pos+len) changed and are readable now
	KIND_MMAP = 2,    // a page went dirty through a fault: write back, then read
	KIND_ATTR = 3,    // inode metadata changed (size, mode, owner, times, entries)
	KIND_PREOP = 4,   // [pos, pos+len) is about to change; read after the next ATTR
	KIND_NEW = 5,     // a new inode: an older one with this number is gone
};

enum counter {
	CTR_SEQ = 0,
	CTR_LOST = 1,     // records that could not be reserved
	CTR_RESCAN = 2,   // overflow marks that did not fit: whole-tree rescan
	CTR_DIO_FULL = 3, // direct writes that found dio_writes full
	CTR_MAX = 4,
};

#define FMODE_WRITE_BIT 0x2

struct record {
	__u64 seq;
	__u64 ino;
	__u64 pos;
	__u64 len;
	__u32 dev;
	__u32 gen;
	__u8 kind;
	__u8 hook;
	__u8 pad[6];
};

struct inode_key {
	__u64 ino;
	__u32 dev;
	__u32 pad;
};

struct chunk_key {
	__u64 ino;
	__u64 chunk;
	__u32 dev;
	__u32 pad;
};

struct task_write {
	__u64 ino;
	__u64 first; // first 4 KiB page index of the last write_end
	__u64 last;
	__u64 ts;    // 0: consumed, or the write(2) returned
	__u32 dev;
	__u32 span;  // SPAN_*: which folios of [first, last] are the write's
	// The inode's address and generation, and for btrfs its subvolume
	// root's address: a btrfs folio of the same inode (all four) takes
	// dev from here instead of a second helper read (see btrfs_dev_of).
	__u64 inode;
	__u32 gen;
	__u32 pad;
	__u64 root;
	// The last chunk mark this task found or made on a btrfs write:
	// [c_lo, c_hi) of chunk c_chunk of (c_ino, c_dev), covered by a
	// record not yet read as of forget epoch c_epoch (see data()).
	__u64 c_ino;
	__u64 c_chunk;
	__u64 c_epoch;
	__u32 c_dev;
	__u32 c_lo;
	__u32 c_hi;
	__u32 c_pad;
};

// What a task_write vouches for: the one folio of the last write_end (it
// is consumed by that folio's writeback_dirty_folio); every folio of its
// range within SUPPRESS_WINDOW_NS (an iomap write, renewed at each step);
// every folio of its range until the syscall returns (a btrfs write, whose
// exit clears it: it is made only in a syscall whose exit is hooked). An
// exit that does not run (a classic tracepoint program is skipped while
// another BPF program or a bpf() map operation holds the CPU) leaves a
// mark that hides nothing: a folio is taken for the write's only while
// the file has no shared writable mapping, through which alone a store
// could dirty it. The device such a mark gives a btrfs folio is its own
// inode's only: the mark names the inode and its subvolume's root by
// address (see btrfs_dev_of).
#define SPAN_ONE 0
#define SPAN_WINDOW 1
#define SPAN_SYSCALL 2

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 16 << 20);
} events SEC(".maps");

// Watched superblocks (kernel dev_t encoding), set before loading: a
// compare against constants is the cheapest filter for hooks that fire on
// every filesystem of the machine.
#define MAX_WATCHED 8
volatile const __u32 WATCHED_DEVS[MAX_WATCHED] = {};

// Chunks with a record in flight (see data()). Userspace deletes a key
// before it reads the chunk's bytes, so a write that finds its bytes inside
// the announced extent of a live key is covered by a record still to be read.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 17);
	__type(key, struct chunk_key);
	__type(value, __u64);
} chunks SEC(".maps");

// Inodes with an ATTR record in flight.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 16);
	__type(key, struct inode_key);
	__type(value, __u8);
} attrs SEC(".maps");

// Inodes whose record was lost (ring buffer full): userspace rescans them.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 16);
	__type(key, struct inode_key);
	__type(value, __u8);
} overflow SEC(".maps");

// Direct I/O writes in flight, keyed by kiocb address. Not an LRU: one
// evicted (about 3,900 writes in flight on 2 CPUs, fewer with more) was
// never reported (TestDirectWritesInFlightAllReported, from a review). A
// write that finds the map full is counted (CTR_DIO_FULL), and from then
// on a completion the map does not know is taken for a write if its file
// is open for writing: a rescan marked at the start could read the file
// before the write completes, and a read so taken ships unchanged bytes.
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 16);
	__type(key, __u64);
	__type(value, __u8);
} dio_writes SEC(".maps");

// The task's last buffered write_end: lets writeback_dirty_folio, which
// follows it in the same task, tell a folio dirtied by write(2) from one
// dirtied through a shared mapping. Task storage, so that a task preempted
// or moved to another CPU in between still finds its own write: a miss
// reports the whole folio (up to 2 MiB of a large folio) to be written back
// and shipped for a 4 KiB write. The entry dies when the write syscall
// returns (sys_exit_write_family), and SUPPRESS_WINDOW_NS after the
// write_end in any case. A task that can store through a mapping gets an
// entry only inside a syscall whose exit is hooked (see may_mark).
struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct task_write);
} task_writes SEC(".maps");

// Range operation in progress per task, reported again when fallocate(2)
// returns: by then the bytes are what they will be.
struct falloc {
	__u64 ino;
	__u64 pos;
	__u64 len;
	__u32 dev;
	__u32 gen;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct falloc);
} fallocs SEC(".maps");

// Inodes whose update a syscall made, reported when it returns (btrfs):
// the kernel's last hook with the inode (its ctime update) comes before
// some of the change (a utimensat's mtime, an unlink's link count, a
// rename's dentry move), and the exit after all of it.
#define MAX_PENDING 4

struct pending_inode {
	__u64 ino;
	__u32 dev;
	__u32 gen;
};

struct task_attrs {
	__u32 n;
	__u32 pad;
	struct pending_inode e[MAX_PENDING];
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct task_attrs);
} task_attrs SEC(".maps");

// The btrfs ranges a task's range operations locked in the syscall it
// runs (btrfs_range_locked), reported again as data when it returns
// (flush_attrs): by then every change is made, the size moved, the page
// cache dropped.
struct pending_range {
	__u64 ino;
	__u64 lo, hi;
	__u32 dev;
	__u32 gen;
};

struct task_ranges {
	__u32 n;
	__u32 pad;
	struct pending_range e[MAX_PENDING];
};

struct {
	__uint(type, BPF_MAP_TYPE_TASK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct task_ranges);
} task_ranges SEC(".maps");

// Mapped into the daemon (BPF_F_MMAPABLE): every durability call reads
// the sequence and the loss count, which took three bpf() syscalls a read,
// about a tenth of the primary's CPU in the 4 KiB write + fdatasync row.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, CTR_MAX);
	__type(key, __u32);
	__type(value, __u64);
} counters SEC(".maps");

// The forget epoch: userspace adds one after it deletes chunk marks and
// before it reads their bytes (Capture.ForgetChunks), and so does data()
// after it drops a mark itself. A task's cached mark (task_write.c_*) is
// good only in the epoch it was found in. Mapped writable into the daemon.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(map_flags, BPF_F_MMAPABLE);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} forget_epoch SEC(".maps");

static __always_inline __u64 *epoch_word(void)
{
	__u32 zero = 0;

	return bpf_map_lookup_elem(&forget_epoch, &zero);
}

// Force the record type into BTF for bpf2go -type.
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct record);
} record_type SEC(".maps");

static __always_inline void bump(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);
	if (v)
		__sync_fetch_and_add(v, 1);
}

static __always_inline __u64 next_seq(void)
{
	__u32 idx = CTR_SEQ;
	__u64 *v = bpf_map_lookup_elem(&counters, &idx);
	if (!v)
		return 0;
	return __sync_fetch_and_add(v, 1) + 1;
}

static __always_inline int is_watched(__u32 dev)
{
	for (int i = 0; i < MAX_WATCHED; i++) {
		if (WATCHED_DEVS[i] == 0)
			return 0;
		if (WATCHED_DEVS[i] == dev)
			return 1;
	}
	return 0;
}

// Superblocks (s_dev) of the watched btrfs filesystems, set before
// loading. A btrfs inode's s_dev is not what stat(2) reports: each
// subvolume has its own anonymous device, and its own inode numbers.
// Records carry the subvolume's device, which WATCHED_DEVS holds.
volatile const __u32 BTRFS_SBS[MAX_WATCHED] = {};

static __always_inline int is_btrfs_sb(__u32 dev)
{
	for (int i = 0; i < MAX_WATCHED; i++) {
		if (BTRFS_SBS[i] == 0)
			return 0;
		if (BTRFS_SBS[i] == dev)
			return 1;
	}
	return 0;
}

// The device stat(2) reports for a btrfs inode: its subvolume's.
static __always_inline __u32 btrfs_subvol_dev(struct inode *inode)
{
	struct btrfs_inode *bi = (void *)inode - bpf_core_field_offset(struct btrfs_inode, vfs_inode);

	return BPF_CORE_READ(bi, root, anon_dev);
}

static __always_inline int watched(struct inode *inode, __u32 *dev)
{
	if (!inode)
		return 0;
	*dev = BPF_CORE_READ(inode, i_sb, s_dev);
	if (is_watched(*dev))
		return 1;
	if (!is_btrfs_sb(*dev))
		return 0;
	*dev = btrfs_subvol_dev(inode);
	return is_watched(*dev);
}

// watched_btrfs is watched for the hooks that only btrfs needs: ext4 and
// XFS report the same changes with their own.
static __always_inline int watched_btrfs(struct inode *inode, __u32 *dev)
{
	if (!inode || !is_btrfs_sb(BPF_CORE_READ(inode, i_sb, s_dev)))
		return 0;
	*dev = btrfs_subvol_dev(inode);
	return is_watched(*dev);
}

// The mark (or the whole-tree rescan) before the count: userspace reads
// the count first and then takes the marks, so every loss it counted has
// its mark by then (a barrier relies on it: docs/DESIGN.md §5).
static __always_inline void mark_overflow(__u32 dev, __u64 ino)
{
	struct inode_key k = { .ino = ino, .dev = dev };
	__u8 one = 1;

	// BPF_NOEXIST: a mark already there stays where it is (re-inserting
	// it could move it past a reader walking its bucket); only a full map
	// calls for the whole-tree rescan.
	long err = bpf_map_update_elem(&overflow, &k, &one, BPF_NOEXIST);

	if (err && err != -17) // -EEXIST (vmlinux.h has no errno names)
		bump(CTR_RESCAN);
	bump(CTR_LOST);
}

static __always_inline int emit_raw(__u32 dev, __u64 ino, __u32 gen, __u8 kind,
				    __u8 hook, __u64 pos, __u64 len)
{
	struct record *r = bpf_ringbuf_reserve(&events, sizeof(*r), 0);

	if (!r) {
		mark_overflow(dev, ino);
		return -1;
	}
	r->seq = next_seq();
	r->ino = ino;
	r->pos = pos;
	r->len = len;
	r->dev = dev;
	r->gen = gen;
	r->kind = kind;
	r->hook = hook;
	// Waking the reader costs more than the record: let it poll (every
	// 2 ms) and wake it only when the ring starts to fill, unless a
	// barrier is about to want this record.
	bpf_ringbuf_submit(r, EAGER_WAKE || bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) > RING_WAKE_BYTES ?
				      BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
	return 0;
}

static __always_inline int emit(struct inode *inode, __u32 dev, __u8 kind,
				__u8 hook, __u64 pos, __u64 len)
{
	return emit_raw(dev, BPF_CORE_READ(inode, i_ino), BPF_CORE_READ(inode, i_generation),
			kind, hook, pos, len);
}

// A full memory barrier: a locked instruction (x86's JIT makes a BPF
// atomic one) on this CPU's own word.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} fence_word SEC(".maps");

static __always_inline void full_fence(void)
{
	__u32 zero = 0;
	__u64 *w = bpf_map_lookup_elem(&fence_word, &zero);

	if (w)
		__sync_fetch_and_add(w, 1);
}

// attr_marked says whether an inode's update is covered by a record still
// unread (its mark is there). Most updates are (a write moves the times,
// once a tick or at every write), and an insert that finds the mark takes
// the bucket's lock with interrupts off, several times the cost of a
// lookup on a paravirtualised guest (btrfs's ctime hook, at every write).
// The fence orders the update's stores before the lookup, as the lock
// did: a mark seen here is deleted by userspace only after this point,
// and its read of the inode, which follows the delete, sees the update.
static __always_inline int attr_marked(struct inode_key *k)
{
	full_fence();
	return bpf_map_lookup_elem(&attrs, k) != NULL;
}

// emit_attr reports an inode update, coalesced per inode: a mark still
// there means a record that userspace has not taken yet, and it deletes
// the mark before it reads the inode.
static __always_inline void emit_attr(__u32 dev, __u64 ino, __u32 gen, __u8 hook)
{
	struct inode_key k = { .ino = ino, .dev = dev };
	__u8 one = 1;

	if (attr_marked(&k))
		return;
	// Only a mark already there (-EEXIST: a record not taken yet) spares
	// the record. A full map (-E2BIG: 65536 inodes marked while no pass
	// took them, the peer away, or many inodes of the filesystem outside
	// the tree changed) reports the change without a mark: it was lost
	// without a trace (TestAttrMarksFullChangeNotSilent, from a review).
	long err = bpf_map_update_elem(&attrs, &k, &one, BPF_NOEXIST);

	if (err == -17) // -EEXIST
		return;
	if (emit_raw(dev, ino, gen, KIND_ATTR, hook, 0, 0) && !err)
		bpf_map_delete_elem(&attrs, &k);
}

// flush_attrs reports the inodes the returning syscall updated, and the
// btrfs ranges its range operations changed (task_ranges).
static __always_inline void flush_attrs(void)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct task_attrs *ta = bpf_task_storage_get(&task_attrs, task, 0, 0);
	struct task_ranges *tr = bpf_task_storage_get(&task_ranges, task, 0, 0);

	if (tr && tr->n) {
		for (int i = 0; i < MAX_PENDING; i++) {
			if (i >= tr->n)
				break;
			struct pending_range *e = &tr->e[i & (MAX_PENDING - 1)];

			// Uncoalesced: a chunk's mark may stand for a record
			// read while the operation ran.
			emit_raw(e->dev, e->ino, e->gen, KIND_DATA, 36, e->lo, e->hi - e->lo);
		}
		tr->n = 0;
	}
	if (!ta || !ta->n)
		return;
	for (int i = 0; i < MAX_PENDING; i++) {
		if (i >= ta->n)
			break;
		emit_attr(ta->e[i].dev, ta->e[i].ino, ta->e[i].gen, 28);
	}
	ta->n = 0;
}

// A chunk mark is one 64-bit word, read and written whole: a 32-bit tag of
// the key (hash elements are recycled, a lookup may return one that now
// belongs to another key) and the announced extent [lo, hi) within the
// chunk, in MARK_UNITs, rounded in (within its record's extent).
static __always_inline __u32 chunk_tag(struct chunk_key *k)
{
	__u64 h = k->ino * 0x9e3779b97f4a7c15ULL ^ k->chunk * 0xc2b2ae3d27d4eb4fULL ^ k->dev;
	return (__u32)(h >> 32) | 1; // never 0
}

// pack takes lo and hi in bytes, multiples of MARK_UNIT, hi > lo.
static __always_inline __u64 pack(__u32 tag, __u64 lo, __u64 hi)
{
	return (__u64)tag << 32 | (lo >> MARK_SHIFT) << 16 | ((hi >> MARK_SHIFT) - 1);
}

// data reports [pos, pos+len) of inode, coalesced per chunk. The mark is
// written before the record is emitted, so a write that finds its bytes
// inside a mark is always covered by a record that userspace reads after
// deleting the mark, hence after that write.
static __always_inline __u8 data_kind(struct inode *inode);

// remember_mark caches in the task's mark a chunk mark's extent [lo, hi),
// found or made in forget epoch epoch.
static __always_inline void remember_mark(struct task_write *tw, struct chunk_key *k,
					  __u64 epoch, __u64 lo, __u64 hi)
{
	if (!tw || hi <= lo)
		return;
	tw->c_ino = k->ino;
	tw->c_chunk = k->chunk;
	tw->c_dev = k->dev;
	tw->c_epoch = epoch;
	tw->c_lo = lo;
	tw->c_hi = hi;
}

// kind 0 means "data, or mmap if the file has a shared writable mapping",
// resolved only when a record is emitted. tw, when not NULL, is the
// task's mark, which caches the last chunk mark the task found or made: a
// btrfs write reports each 4 KiB folio, and the chunk's lookup was most
// of the cost of each. The cache is good while the forget epoch has not
// moved: userspace deletes marks and only then adds to the epoch and reads
// the bytes, so a folio whose epoch load comes before that add has had its
// copy made before it (the copy precedes the load, with the extent tree's
// lock in between), and the read sees it: the same reasoning as a lookup
// that finds the mark. The epoch is read before the lookup whose result
// is cached, so a delete that the lookup missed is followed by an add the
// cache sees.
static __always_inline void data_tw(struct inode *inode, __u32 dev, __u8 kind,
				    __u8 hook, __u64 pos, __u64 len, struct task_write *tw)
{
	struct chunk_key k = { .dev = dev };
	__u64 end = pos + len, epoch = 0, *ew;

	if (len == 0)
		return;
	if (tw) {
		ew = epoch_word();
		if (!ew)
			tw = NULL;
		else
			epoch = *(volatile __u64 *)ew;
	}
	// Direct loads: every caller's inode is a BTF pointer, and this runs
	// for every folio of a btrfs write.
	k.ino = inode->i_ino;
	for (int i = 0; i < MAX_CHUNKS_PER_EVENT; i++) {
		__u64 base, lo, hi, nlo, nhi, packed, cur = 0;
		__u32 tag;
		__u64 *v;

		if (pos >= end)
			return;
		k.chunk = pos >> CHUNK_SHIFT;
		base = k.chunk << CHUNK_SHIFT;
		lo = pos - base;
		hi = end - base;
		if (hi > CHUNK_SIZE)
			hi = CHUNK_SIZE;
		nlo = lo;
		nhi = hi;
		if (tw && tw->c_epoch == epoch && tw->c_ino == k.ino && tw->c_chunk == k.chunk &&
		    tw->c_dev == dev && lo >= tw->c_lo && hi <= tw->c_hi)
			goto next;
		tag = chunk_tag(&k);
		v = bpf_map_lookup_elem(&chunks, &k);
		if (v)
			cur = *(volatile __u64 *)v;
		if (v && (__u32)(cur >> 32) == tag) {
			__u64 clo = ((cur >> 16) & 0xffff) << MARK_SHIFT, chi = ((cur & 0xffff) + 1) << MARK_SHIFT;

			if (lo >= clo && hi <= chi) {
				remember_mark(tw, &k, epoch, clo, chi);
				goto next;
			}
			if (!kind)
				kind = data_kind(inode);
			if (lo >= chi + MARK_UNIT || hi + MARK_UNIT <= clo) {
				// Apart from the mark: report exactly these
				// bytes and leave the mark as it is, so that no
				// gap between the two is ever shipped.
				if (emit(inode, dev, kind, hook, base + lo, hi - lo))
					return;
				goto next;
			}
			// Touching or overlapping (the mark, rounded in, may end
			// up to a unit short of its record): one contiguous
			// extent. A run growing past the mark's end is most
			// likely sequential: announce as far ahead as it already
			// reaches, so a sequential writer costs a few records per
			// chunk.
			nlo = lo < clo ? lo : clo;
			nhi = hi > chi ? hi : chi;
			if (hi > chi) {
				__u64 size = inode->i_size, in = size > base ? size - base : 0;

				nhi = hi + (hi - nlo);
				if (nhi > CHUNK_SIZE)
					nhi = CHUNK_SIZE;
				// Past the end of the file (an append: the size
				// is not updated yet), no further than the next
				// 64 KiB: a pass that finds bytes beyond EOF
				// retries them, and a writer of 64 KiB appends
				// with a flush each MiB waited for it (its
				// throughput fell by 12 % with 1 MiB ahead).
				if (nhi > in) {
					__u64 cap = (hi + AHEAD_PAST_EOF - 1) & ~(AHEAD_PAST_EOF - 1);

					if (nhi > cap)
						nhi = cap > in ? cap : in;
				}
			}
			// Holds the old mark, so not empty rounded in.
			packed = pack(tag, (nlo + MARK_UNIT - 1) & ~(MARK_UNIT - 1), nhi & ~(MARK_UNIT - 1));
			if (bpf_map_update_elem(&chunks, &k, &packed, BPF_EXIST))
				bpf_map_update_elem(&chunks, &k, &packed, BPF_NOEXIST);
		} else {
			__u64 mlo = (nlo + MARK_UNIT - 1) & ~(MARK_UNIT - 1), mhi = nhi & ~(MARK_UNIT - 1);

			if (!kind)
				kind = data_kind(inode);
			// Too short to hold a whole unit: no mark, a record only.
			packed = 0;
			if (mhi > mlo) {
				packed = pack(tag, mlo, mhi);
				if (bpf_map_update_elem(&chunks, &k, &packed, BPF_NOEXIST))
					bpf_map_update_elem(&chunks, &k, &packed, BPF_ANY);
			}
		}
		if (emit(inode, dev, kind, hook, base + nlo, nhi - nlo)) {
			// No record for this mark: drop it (the file is marked
			// for a rescan by emit) so later writes report again,
			// also those of tasks that cached it.
			bpf_map_delete_elem(&chunks, &k);
			ew = epoch_word();
			if (ew)
				__sync_fetch_and_add(ew, 1);
			return;
		}
		// The mark just written, whose extent this record covers.
		if (packed)
			remember_mark(tw, &k, epoch, ((packed >> 16) & 0xffff) << MARK_SHIFT,
				      ((packed & 0xffff) + 1) << MARK_SHIFT);
next:
		pos = base + CHUNK_SIZE;
	}
	// A longer range than the loop covers: report the rest uncoalesced.
	if (pos < end)
		emit(inode, dev, kind ? kind : data_kind(inode), hook, pos, end - pos);
}

static __always_inline void data(struct inode *inode, __u32 dev, __u8 kind,
				 __u8 hook, __u64 pos, __u64 len)
{
	data_tw(inode, dev, kind, hook, pos, len, NULL);
}

// A file with a shared writable mapping can be stored to without a fault
// while its pages are dirty: its ranges must be written back before they
// are read (KIND_MMAP), so that any later store faults and is reported.
static __always_inline __u8 data_kind(struct inode *inode)
{
	if (BPF_CORE_READ(inode, i_mapping, i_mmap_writable.counter) > 0)
		return KIND_MMAP;
	return KIND_DATA;
}

// in_syscall_body says whether a task whose registers are regs is running
// its syscall, not work done on its way back to user mode after the exit
// tracepoint (task_work: io_uring runs linked requests there): x86-64's
// entry sets ax to -ENOSYS and the syscall's return value replaces it
// before the exit tracepoint fires.
#define ENOSYS 38
static __always_inline int in_syscall_body(struct pt_regs *regs)
{
	return (long)regs->ax == -ENOSYS;
}

// Syscalls (x86-64 numbers) whose exit runs sys_exit_write_family, one bit
// each; userspace sets a bit once that exit is attached.
volatile __u64 MARKED_SYSCALLS[8] = {};

#define PF_IO_WORKER 0x00000010
#define PF_USER_WORKER 0x00004000
#define PF_KTHREAD 0x00200000
#define TS_COMPAT 0x0002

// native_syscall_regs returns the registers of task's native (x86-64)
// syscall whose body it runs, or NULL. Kernel threads and io_uring's and
// vhost's workers run none, and 32-bit syscalls fire no syscall
// tracepoint.
static __always_inline struct pt_regs *native_syscall_regs(struct task_struct *task)
{
	struct pt_regs *regs;

	if (task->flags & (PF_KTHREAD | PF_IO_WORKER | PF_USER_WORKER))
		return NULL;
	if (task->thread_info.status & TS_COMPAT)
		return NULL;
	regs = (struct pt_regs *)bpf_task_pt_regs(task);
	if (!regs || !in_syscall_body(regs))
		return NULL;
	return regs;
}

// in_syscall_of says whether task runs the body of one of the syscalls of
// set (a bitmap by x86-64 number; see native_syscall_regs).
static __always_inline int in_syscall_of(struct task_struct *task, volatile __u64 *set)
{
	struct pt_regs *regs = native_syscall_regs(task);
	__u64 nr;

	if (!regs)
		return 0;
	nr = regs->orig_ax;
	return nr < 512 && (set[nr >> 6] >> (nr & 63)) & 1;
}

// in_marked_syscall says whether task runs the body of a syscall whose
// exit runs sys_exit_write_family (see may_mark).
static __always_inline int in_marked_syscall(struct task_struct *task)
{
	return in_syscall_of(task, MARKED_SYSCALLS);
}

// may_mark says whether task's mark is sure to die before it could stand
// for a store through a mapping. A kernel thread without a user mm has no
// mapping to store through: its mark may live out SUPPRESS_WINDOW_NS
// (nfsd, loop). Any other task (io_uring and vhost workers share the
// user's mm) only inside a syscall whose exit is hooked: an io-wq worker
// never returns from one, and 32-bit syscalls fire no syscall tracepoint,
// so a mark left unused there (the folio was already dirty) would hide a
// store made by the same task within the window (a read into a buffer
// mapped from the file), and its bytes would never be read.
static __always_inline int may_mark(struct task_struct *task)
{
	if (task->flags & PF_KTHREAD)
		return !task->mm;
	return in_marked_syscall(task);
}

// remember_write marks [pos, pos+len) of inode as the task's write (see
// task_write). SPAN_SYSCALL, asked for outside the body of a syscall whose
// exit is hooked, becomes SPAN_ONE; a SPAN_SYSCALL mark grows with each
// folio that follows in the same file, without a clock read (with the other helper
// calls it cost 7 % of a 64 KiB btrfs write, a folio at a time).
// tw is the task's mark if the caller has looked it up already, or NULL.
// It returns the task's mark (NULL if there is none).
static __always_inline struct task_write *remember_write_in(struct task_struct *task, struct task_write *tw,
					      struct inode *inode, __u32 dev, __u64 root,
					      __u64 pos, __u64 len, __u32 span)
{
	__u64 ino, first = pos >> PAGE_SHIFT_4K, last = (pos + (len ? len - 1 : 0)) >> PAGE_SHIFT_4K;

	if (span == SPAN_SYSCALL && !in_marked_syscall(task))
		span = SPAN_ONE;
	if (span != SPAN_SYSCALL && !may_mark(task))
		return tw;
	if (!tw)
		tw = bpf_task_storage_get(&task_writes, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
	if (!tw)
		return NULL;
	// Direct load: every caller's inode is a BTF pointer.
	ino = inode->i_ino;
	if (span == SPAN_SYSCALL && tw->ts && tw->span == SPAN_SYSCALL && tw->ino == ino &&
	    tw->dev == dev && first >= tw->first && first <= tw->last + 1) {
		if (last > tw->last)
			tw->last = last;
		return tw;
	}
	tw->ino = ino;
	tw->first = first;
	tw->last = last;
	tw->ts = bpf_ktime_get_ns();
	tw->dev = dev;
	tw->span = span;
	tw->inode = (__u64)inode;
	tw->gen = inode->i_generation;
	tw->root = root;
	return tw;
}

// btrfs_dev_of is the subvolume device of a btrfs inode (see
// btrfs_subvol_dev), and *root its subvolume root's address. The device
// is taken from the task's write mark when the mark names the same inode
// in the same subvolume: btrfs dirties a write folio by folio (4 KiB),
// and the two helper reads of btrfs_subvol_dev, in btrfs_set_extent_bit
// and in writeback_dirty_folio for each folio, were most of their run
// time; the root's read is left. A mark can outlive its write (an exit
// program skipped, a kernel thread's mark whose folio was already dirty),
// and a snapshot's files have their source's inode numbers and
// generations: the source's inode freed and the snapshot's allocated at
// its address (the slab's rule) matched the mark on the inode alone, and
// the snapshot's write was reported for the source's subvolume
// (TestBtrfsDevOfStaleMarkSnapshot). The two subvolumes' roots are both
// allocated then, at two addresses.
static __always_inline __u32 btrfs_dev_of(struct inode *inode, struct task_write *tw, __u64 *root)
{
	struct btrfs_inode *bi = (void *)inode - bpf_core_field_offset(struct btrfs_inode, vfs_inode);
	struct btrfs_root *r = BPF_CORE_READ(bi, root);

	*root = (__u64)r;
	if (r && tw && tw->ts && tw->root == (__u64)r && tw->inode == (__u64)inode &&
	    tw->ino == inode->i_ino && tw->gen == inode->i_generation)
		return tw->dev;
	return BPF_CORE_READ(r, anon_dev);
}

static __always_inline void remember_write(struct inode *inode, __u32 dev,
					   __u64 pos, __u64 len, __u32 span)
{
	remember_write_in(bpf_get_current_task_btf(), NULL, inode, dev, 0, pos, len, span);
}

static __always_inline void write_end(struct inode *inode, loff_t pos,
				      unsigned int copied, __u8 hook)
{
	__u32 dev;

	if (!watched(inode, &dev) || copied == 0)
		return;
	remember_write(inode, dev, pos, copied, SPAN_ONE);
	data(inode, dev, 0, hook, pos, copied);
}

SEC("tp_btf/ext4_da_write_end")
int BPF_PROG(ext4_da_write_end, struct inode *inode, loff_t pos,
	     unsigned int len, unsigned int copied)
{
	write_end(inode, pos, copied, 1);
	return 0;
}

SEC("tp_btf/ext4_write_end")
int BPF_PROG(ext4_write_end, struct inode *inode, loff_t pos,
	     unsigned int len, unsigned int copied)
{
	write_end(inode, pos, copied, 2);
	return 0;
}

SEC("tp_btf/ext4_journalled_write_end")
int BPF_PROG(ext4_journalled_write_end, struct inode *inode, loff_t pos,
	     unsigned int len, unsigned int copied)
{
	write_end(inode, pos, copied, 3);
	return 0;
}

// A folio went clean -> dirty. After write(2) this follows the write_end of
// the same task and page at once and is already reported, unless the file
// has a shared writable mapping; otherwise it is a store through a shared
// mapping, reported before the store lands.
SEC("tp_btf/writeback_dirty_folio")
int BPF_PROG(writeback_dirty_folio, struct folio *folio,
	     struct address_space *mapping)
{
	struct task_write *tw;
	struct inode *inode;
	__u64 index, nr, pos, len;
	__u64 root;
	__u32 dev;
	int btrfs;

	if (!mapping || !folio)
		return 0;
	// Direct loads (the arguments are BTF pointers): this fires for
	// every folio of the machine that goes dirty, with interrupts off,
	// and a helper call of BPF_CORE_READ costs more than the rest.
	inode = mapping->host;
	if (!inode)
		return 0;
	dev = inode->i_sb->s_dev;
	btrfs = !is_watched(dev);
	if (btrfs && !is_btrfs_sb(dev))
		return 0;
	tw = bpf_task_storage_get(&task_writes, bpf_get_current_task_btf(), 0, 0);
	if (btrfs) {
		dev = btrfs_dev_of(inode, tw, &root);
		if (!is_watched(dev))
			return 0;
	}
	index = folio->index;
	nr = 1;
	// Large folios: order lives in the second page's flags (_flags_1 low byte).
	if (folio->flags.f & (1UL << PG_head))
		nr = 1ULL << (folio->_flags_1 & 0xff);
	if (tw && tw->ts && tw->ino == inode->i_ino && tw->dev == dev &&
	    tw->first < index + nr && tw->last >= index &&
	    (tw->span == SPAN_SYSCALL || bpf_ktime_get_ns() - tw->ts < SUPPRESS_WINDOW_NS)) {
		if (tw->span == SPAN_ONE)
			tw->ts = 0;
		// Unless the file is mapped shared and writable: a store into
		// the folio now finds it dirty and fires nothing until it is
		// written back, while the write's record covers only its bytes.
		if (inode->i_mapping->i_mmap_writable.counter <= 0)
			return 0;
	}
	pos = index << PAGE_SHIFT_4K;
	len = nr << PAGE_SHIFT_4K;
	emit(inode, dev, KIND_MMAP, 4, pos, len);
	return 0;
}

SEC("tp_btf/iomap_dio_rw_begin")
int BPF_PROG(iomap_dio_rw_begin, struct kiocb *iocb, struct iov_iter *iter,
	     unsigned int dio_flags, size_t done_before)
{
	struct inode *inode;
	__u64 key = (__u64)iocb;
	__u8 one = 1;
	__u32 dev;

	if (!iocb || !iter)
		return 0;
	inode = BPF_CORE_READ(iocb, ki_filp, f_inode);
	if (!inode || !watched(inode, &dev))
		return 0;
	if (!BPF_CORE_READ(iter, data_source))
		return 0;
	if (bpf_map_update_elem(&dio_writes, &key, &one, BPF_ANY))
		bump(CTR_DIO_FULL);
	return 0;
}

// ki_pos has already moved past the bytes written when this fires.
SEC("tp_btf/iomap_dio_complete")
int BPF_PROG(iomap_dio_complete, struct kiocb *iocb, int error, ssize_t ret)
{
	struct inode *inode;
	__u64 key = (__u64)iocb;
	__u64 end;
	__u32 dev;

	if (!iocb)
		return 0;
	if (!bpf_map_lookup_elem(&dio_writes, &key)) {
		__u32 idx = CTR_DIO_FULL;
		__u64 *full = bpf_map_lookup_elem(&counters, &idx);

		if (!full || !*full || !(BPF_CORE_READ(iocb, ki_filp, f_mode) & FMODE_WRITE_BIT))
			return 0;
	}
	inode = BPF_CORE_READ(iocb, ki_filp, f_inode);
	bpf_map_delete_elem(&dio_writes, &key);
	if (!inode || !watched(inode, &dev) || ret <= 0)
		return 0;
	end = BPF_CORE_READ(iocb, ki_pos);
	if ((__u64)ret > end)
		ret = end;
	// Direct writes bypass the chunk map: a chunk key would not see them
	// complete in order with buffered writes to the same range.
	emit(inode, dev, data_kind(inode), 5, end - ret, ret);
	return 0;
}

// Called whenever ext4 copies an in-memory inode to its on-disk buffer:
// after every change of size, mode, owner, times, link count, and of a
// directory's entries (its mtime moves). Coalesced per inode.
SEC("tp_btf/ext4_mark_inode_dirty")
int BPF_PROG(ext4_mark_inode_dirty, struct inode *inode, unsigned long ip)
{
	__u32 dev;

	// Direct loads (a BTF pointer; an ext4 inode, so s_dev is the
	// device records carry): this fires at most writes.
	if (!inode)
		return 0;
	dev = inode->i_sb->s_dev;
	if (!is_watched(dev))
		return 0;
	emit_attr(dev, inode->i_ino, inode->i_generation, 6);
	return 0;
}

// Range operations that change bytes without write(2). They fire before the
// change. When called from fallocate(2) the range is reported again as data
// when the syscall returns; from other callers the PREOP record is read
// after a later ATTR record or a timeout.
//
// An operation on two files (an XFS range exchange) keeps the second one's
// range in slot 1: the task's key with the top bit set, which a tgid never
// has.
#define PREOP_SLOTS 2

// preop_key reports [pos, pos+len) of inode as about to change, and keeps
// it under key for the completion (a syscall's exit, an io_uring request's
// completion) that reports it again as data.
static __always_inline void preop_key(struct inode *inode, __u32 dev, __u64 pos,
				      __u64 len, __u8 hook, __u64 key)
{
	struct inode_key k = {};
	struct falloc fa = {};

	k.ino = BPF_CORE_READ(inode, i_ino);
	k.dev = dev;
	bpf_map_delete_elem(&attrs, &k);
	fa.ino = k.ino;
	fa.pos = pos;
	fa.len = len;
	fa.dev = dev;
	fa.gen = BPF_CORE_READ(inode, i_generation);
	bpf_map_update_elem(&fallocs, &key, &fa, BPF_ANY);
	emit(inode, dev, KIND_PREOP, hook, pos, len);
}

static __always_inline void preop_slot(struct inode *inode, __u64 pos, __u64 len,
				       __u8 hook, __u64 slot)
{
	__u32 dev;

	if (!watched(inode, &dev))
		return;
	preop_key(inode, dev, pos, len, hook, bpf_get_current_pid_tgid() | slot << 63);
}

static __always_inline void preop(struct inode *inode, __u64 pos, __u64 len,
				  __u8 hook)
{
	preop_slot(inode, pos, len, hook, 0);
}

SEC("tracepoint/syscalls/sys_exit_fallocate")
int sys_exit_fallocate(struct trace_event_raw_sys_exit *ctx)
{
	for (__u64 slot = 0; slot < PREOP_SLOTS; slot++) {
		__u64 id = bpf_get_current_pid_tgid() | slot << 63;
		struct falloc *fa = bpf_map_lookup_elem(&fallocs, &id);

		// Both slots: an exchange whose first file is not watched
		// has only the second.
		if (!fa)
			continue;
		// Uncoalesced: a chunk's in-flight record may already have
		// been read while the operation ran.
		emit_raw(fa->dev, fa->ino, fa->gen, KIND_DATA, 13, fa->pos, fa->len);
		bpf_map_delete_elem(&fallocs, &id);
	}
	flush_attrs();
	return 0;
}

// A write syscall returned: its write_end no longer vouches for a folio
// the task dirties later (a store through a mapping after an fsync cleaned
// it). Attached to the exits of every syscall that writes through the page
// cache (see Attach).
SEC("tracepoint/syscalls/sys_exit_write")
int sys_exit_write_family(struct trace_event_raw_sys_exit *ctx)
{
	struct task_write *tw = bpf_task_storage_get(&task_writes, bpf_get_current_task_btf(), 0, 0);

	if (tw)
		tw->ts = 0;
	flush_attrs();
	return 0;
}

SEC("tp_btf/ext4_punch_hole")
int BPF_PROG(ext4_punch_hole, struct inode *inode, loff_t offset, loff_t len,
	     int mode)
{
	preop(inode, offset, len, 7);
	return 0;
}

SEC("tp_btf/ext4_zero_range")
int BPF_PROG(ext4_zero_range, struct inode *inode, loff_t offset, loff_t len,
	     int mode)
{
	preop(inode, offset, len, 8);
	return 0;
}

// Collapse and insert shift everything after offset.
SEC("tp_btf/ext4_collapse_range")
int BPF_PROG(ext4_collapse_range, struct inode *inode, loff_t offset, loff_t len)
{
	preop(inode, offset, ~0ULL >> 2, 9);
	return 0;
}

SEC("tp_btf/ext4_insert_range")
int BPF_PROG(ext4_insert_range, struct inode *inode, loff_t offset, loff_t len)
{
	preop(inode, offset, ~0ULL >> 2, 10);
	return 0;
}

// Truncating down zeroes everything past the new size: that is a data
// change even when the file grows back before userspace looks. Report the
// tail; the reader clips it to the size it finds.
SEC("tp_btf/ext4_truncate_enter")
int BPF_PROG(ext4_truncate_enter, struct inode *inode)
{
	__u64 size;
	__u32 dev;

	if (!watched(inode, &dev))
		return 0;
	size = BPF_CORE_READ(inode, i_size);
	emit(inode, dev, KIND_DATA, 14, size, (1ULL << 62) - size);
	return 0;
}

// A new inode. Its number may have belonged to a file that is gone:
// userspace must not take the new one for the old.
SEC("tp_btf/ext4_allocate_inode")
int BPF_PROG(ext4_allocate_inode, struct inode *inode, struct inode *dir, int mode)
{
	__u32 dev;

	if (!watched(inode, &dev))
		return 0;
	emit(inode, dev, KIND_NEW, 11, 0, 0);
	return 0;
}

#define MAP_SHARED_BIT 0x01
#define OVERLAYFS_SUPER_MAGIC 0x794c7630

// OVL_FILE_PRIV: an overlayfs regular file's private data is a struct
// ovl_file whose first member is the real file (Linux 6.13 and later),
// not the real file itself (before). Set from the running kernel's
// version at load: the type's presence in BTF would be decided against
// the modules loaded then, and overlay, a module on most distributions,
// is loaded by the first overlay mount, which may come later (a review).
volatile const __u32 OVL_FILE_PRIV = 1;

// overlay_real_inode is the inode beneath an overlayfs regular file.
static __always_inline struct inode *overlay_real_inode(struct file *file)
{
	void *priv = BPF_CORE_READ(file, private_data);
	struct file *real = priv;

	if (!priv)
		return NULL;
	if (OVL_FILE_PRIV && bpf_probe_read_kernel(&real, sizeof(real), priv))
		return NULL;
	if (!real)
		return NULL;
	return BPF_CORE_READ(real, f_inode);
}

// mmap(MAP_SHARED) of a file open for writing: its pages may already be
// dirty, and stores to dirty pages do not fault. Report the whole file for
// a write-back and read; from then on every store to a clean page faults.
SEC("tracepoint/syscalls/sys_enter_mmap")
int sys_enter_mmap(struct trace_event_raw_sys_enter *ctx)
{
	struct task_struct *task = bpf_get_current_task_btf();
	unsigned long flags = ctx->args[3];
	long fd = (long)ctx->args[4];
	struct file **fds, *file = NULL;
	struct inode *inode;
	__u32 dev;

	if (!(flags & MAP_SHARED_BIT) || fd < 0 || fd > 1 << 20)
		return 0;
	fds = BPF_CORE_READ(task, files, fdt, fd);
	if (!fds || bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]) || !file)
		return 0;
	if (!(BPF_CORE_READ(file, f_mode) & FMODE_WRITE_BIT))
		return 0;
	inode = BPF_CORE_READ(file, f_inode);
	if (BPF_CORE_READ(inode, i_sb, s_magic) == OVERLAYFS_SUPER_MAGIC) {
		// A file of an overlay maps the file beneath (backing_file_mmap),
		// which may be in a watched tree: reported whole as one mapped
		// directly (TestCaptureSharedMappingThroughOverlay). The programs
		// looked at the overlay's inode, not watched: nothing was
		// reported (a review). Read when the call begins, from the
		// overlay's file: a bpf_find_vma once the call returns only
		// try-locks the mm and missed it whenever another thread mapped
		// (a review: 27 of 200 missed).
		inode = overlay_real_inode(file);
		if (!inode || !watched(inode, &dev))
			return 0;
		emit(inode, dev, KIND_MMAP, 35, 0, BPF_CORE_READ(inode, i_size));
		return 0;
	}
	if (!watched(inode, &dev))
		return 0;
	emit(inode, dev, KIND_MMAP, 12, 0, BPF_CORE_READ(inode, i_size));
	return 0;
}

// ---- iomap and XFS ----
//
// XFS writes through the page cache with iomap, not with write_begin and
// write_end: no tracepoint fires per folio after the copy. iomap_iter
// fires at every step of an iomap operation, and a step that follows
// another comes after the previous one's copy: [iter_start_pos, pos) of
// that one is in the page cache by then.

#define IOMAP_WRITE (1 << 0)
#define IOMAP_ZERO (1 << 1)
#define IOMAP_FAULT (1 << 3)
#define IOMAP_DIRECT (1 << 4)
#define IOMAP_UNSHARE (1 << 7)

// Buffered writes, zeroing (truncate, fallocate, EOF) and unsharing of any
// filesystem that writes through iomap. Direct I/O is reported at its
// completion, and a page fault (page_mkwrite) by writeback_dirty_folio.
SEC("tp_btf/iomap_iter")
int BPF_PROG(iomap_iter, struct iomap_iter *iter, const void *ops,
	     unsigned long caller)
{
	struct inode *inode;
	__u64 start, pos, len;
	__u32 flags, dev;

	// Direct loads (the arguments are BTF pointers): the helper calls of
	// BPF_CORE_READ cost more than the rest here, and this fires twice
	// per write.
	flags = iter->flags;
	if (!(flags & (IOMAP_WRITE | IOMAP_ZERO | IOMAP_UNSHARE)) ||
	    (flags & (IOMAP_DIRECT | IOMAP_FAULT)))
		return 0;
	inode = iter->inode;
	if (!inode)
		return 0;
	dev = inode->i_sb->s_dev;
	if (!is_watched(dev))
		return 0;
	pos = iter->pos;
	len = iter->len;
	// The folios this write is about to dirty are its own, not stores
	// through a mapping (see writeback_dirty_folio): the mark spans what
	// is left of the write and is renewed at each step that has some
	// left (len is what the steps so far did not write).
	if ((flags & IOMAP_WRITE) && len)
		remember_write(inode, dev, pos, len, SPAN_WINDOW);
	if (iter->iomap.length == 0)
		return 0; // the first step: nothing copied yet
	start = iter->iter_start_pos;
	// Zeroing past EOF (before a write or a truncate that extends the
	// file) changes nothing a reader sees: the replica's file grows
	// with zeros too. Reported, the gap up to a far write would ship.
	if (!(flags & IOMAP_WRITE)) {
		__u64 size = inode->i_size;

		if (pos > size)
			pos = size;
	}
	if (pos > start)
		data(inode, dev, 0, 15, start, pos - start);
	return 0;
}

#define XFS_LI_INODE 0x123b
#define XFS_LI_DIRTY 3
#define MAX_TRANS_ITEMS 64

// Every XFS change of an inode (size, mode, owner, times, link count, a
// directory's entries, a new inode) is logged in a transaction. When it
// commits, the in-memory inode already holds the change and the inode is
// still locked: a reader sees it once the commit ends. ATTR for each
// inode the transaction logged; NEW, too, for one still being created.
SEC("tp_btf/xfs_trans_commit")
int BPF_PROG(xfs_trans_commit, struct xfs_trans *tp, unsigned long caller)
{
	struct list_head *head = &tp->t_items, *pos;
	__u32 dev = BPF_CORE_READ(tp, t_mountp, m_super, s_dev);
	int i;

	if (!is_watched(dev))
		return 0;
	pos = BPF_CORE_READ(tp, t_items.next);
	for (i = 0; i < MAX_TRANS_ITEMS; i++) {
		struct xfs_log_item *lip;
		struct xfs_inode *ip;
		struct inode *inode;
		struct inode_key k = {};
		__u8 one = 1;
		long err;

		if (!pos || pos == head)
			return 0;
		lip = (void *)pos - bpf_core_field_offset(struct xfs_log_item, li_trans);
		if (BPF_CORE_READ(lip, li_type) != XFS_LI_INODE ||
		    !(BPF_CORE_READ(lip, li_flags) & (1UL << XFS_LI_DIRTY)))
			goto next;
		ip = BPF_CORE_READ((struct xfs_inode_log_item *)lip, ili_inode);
		if (!ip)
			goto next;
		inode = &ip->i_vnode;
		k.ino = BPF_CORE_READ(inode, i_ino);
		k.dev = dev;
		if (BPF_CORE_READ(inode, i_state) & I_NEW)
			emit(inode, dev, KIND_NEW, 17, 0, 0);
		if (attr_marked(&k))
			goto next;
		// As emit_attr: only an existing mark spares the record.
		err = bpf_map_update_elem(&attrs, &k, &one, BPF_NOEXIST);
		if (err == -17) // -EEXIST
			goto next;
		if (emit(inode, dev, KIND_ATTR, 16, 0, 0) && !err)
			bpf_map_delete_elem(&attrs, &k);
next:
		pos = BPF_CORE_READ(pos, next);
	}
	// More items than the loop reads: an inode among the rest would go
	// unreported, so the whole tree is compared instead.
	if (pos != head) {
		bump(CTR_RESCAN);
		bump(CTR_LOST);
	}
	return 0;
}

// Truncating down: the tail from the new size counts as changed (see
// ext4_truncate_enter). Also fires when XFS trims preallocation past EOF
// and frees a deleted inode: a tail past the size reads as nothing.
SEC("tp_btf/xfs_itruncate_extents_start")
int BPF_PROG(xfs_itruncate_extents_start, struct xfs_inode *ip, xfs_fsize_t new_size)
{
	struct inode *inode = &ip->i_vnode;
	__u32 dev;

	if (!watched(inode, &dev) || new_size < 0)
		return 0;
	emit(inode, dev, KIND_DATA, 18, new_size, (1ULL << 62) - new_size);
	return 0;
}

#define NR_FALLOCATE 285
#define FALLOC_FL_COLLAPSE_RANGE 0x08
#define FALLOC_FL_INSERT_RANGE 0x20

// XFS range operations name only the inode. Inside fallocate(2) the range
// is in the syscall's arguments; from any other caller (io_uring) the
// whole file is reported. Collapse and insert shift everything after the
// offset.
static __always_inline void xfs_preop(struct xfs_inode *ip, __u8 hook)
{
	struct pt_regs *regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	__u64 pos = 0, len = ~0ULL >> 2;

	if (regs && BPF_CORE_READ(regs, orig_ax) == NR_FALLOCATE) {
		__u64 mode = BPF_CORE_READ(regs, si);

		pos = BPF_CORE_READ(regs, dx);
		if (!(mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE)))
			len = BPF_CORE_READ(regs, r10);
	}
	preop(&ip->i_vnode, pos, len, hook);
}

// Punch hole and zero range.
SEC("tp_btf/xfs_free_file_space")
int BPF_PROG(xfs_free_file_space, struct xfs_inode *ip)
{
	xfs_preop(ip, 19);
	return 0;
}

SEC("tp_btf/xfs_collapse_file_space")
int BPF_PROG(xfs_collapse_file_space, struct xfs_inode *ip)
{
	xfs_preop(ip, 20);
	return 0;
}

SEC("tp_btf/xfs_insert_file_space")
int BPF_PROG(xfs_insert_file_space, struct xfs_inode *ip)
{
	xfs_preop(ip, 21);
	return 0;
}

// Reflink (FICLONE, FICLONERANGE, copy_file_range): the destination's
// bytes change without a write. Reported again as data when the syscall
// returns (sys_exit_fallocate is attached to those exits too).
SEC("tp_btf/xfs_reflink_remap_range")
int BPF_PROG(xfs_reflink_remap_range, struct xfs_inode *src, xfs_off_t soffset,
	     xfs_off_t len, struct xfs_inode *dest, xfs_off_t doffset)
{
	preop(&dest->i_vnode, doffset, len > 0 ? len : ~0ULL >> 2, 22);
	return 0;
}

#define XFS_EXCHANGE_RANGE_TO_EOF (1ULL << 0)

// XFS_IOC_EXCHANGE_RANGE swaps the contents of two files' ranges: both
// change without a write. Reported again when the ioctl returns.
SEC("tp_btf/xfs_exchrange_mappings")
int BPF_PROG(xfs_exchrange_mappings, const struct xfs_exchrange *fxr,
	     struct xfs_inode *ip1, struct xfs_inode *ip2)
{
	__u64 len = BPF_CORE_READ(fxr, length);

	if (BPF_CORE_READ(fxr, flags) & XFS_EXCHANGE_RANGE_TO_EOF)
		len = ~0ULL >> 2; // the sizes are exchanged too
	preop_slot(&ip1->i_vnode, BPF_CORE_READ(fxr, file1_offset), len, 23, 0);
	preop_slot(&ip2->i_vnode, BPF_CORE_READ(fxr, file2_offset), len, 23, 1);
	return 0;
}

// ---- btrfs ----
//
// btrfs has no tracepoint after an inode update, and writes through the
// page cache without write_end. What it has: the extent bits of an inode's
// io tree (DELALLOC once a write's bytes are in the page cache, LOCKED
// around a range being changed) and the creation of an inode. Inode
// updates are seen through their ctime (every change of mode, owner,
// times, size, links, entries or xattrs sets it), and reported when the
// syscall that made them returns; range operations by their syscalls.

static __always_inline int io_worker_fallocate(struct inode *inode);
static __always_inline int io_worker_opcode(struct task_struct *task);

#define NR_IOCTL 16
#define NR_COPY_FILE_RANGE 326
#define FICLONE 0x40049409
#define FICLONERANGE 0x4020940d
#define FIDEDUPERANGE 0xc0189436

static __always_inline struct file *fd_file(long fd);
static __always_inline int in_flushed_syscall(struct task_struct *task);

// fd_is says whether descriptor fd of this task is a file of inode.
static __always_inline int fd_is(long fd, struct inode *inode)
{
	struct file *file = fd_file(fd);

	return file && BPF_CORE_READ(file, f_inode) == inode;
}

#define FALLOC_FL_PUNCH_HOLE 0x02
#define FALLOC_FL_ZERO_RANGE 0x10
#define FALLOC_FL_WRITE_ZEROES 0x80
// The fallocate modes that change bytes (allocating and unsharing do not).
#define FALLOC_CHANGES (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_COLLAPSE_RANGE | \
			FALLOC_FL_ZERO_RANGE | FALLOC_FL_INSERT_RANGE | FALLOC_FL_WRITE_ZEROES)

#define MAX_FILE_OFF 0x7fffffffffffffffULL
#define NR_WRITE 1
#define NR_PWRITE64 18
#define NR_WRITEV 20
#define NR_MSYNC 26
#define NR_SENDFILE 40
#define NR_FSYNC 74
#define NR_FDATASYNC 75
#define NR_IO_SUBMIT 209
#define NR_SPLICE 275
#define NR_SYNC_FILE_RANGE 277
#define NR_PWRITEV 296
#define NR_PWRITEV2 328
#define NR_IO_URING_ENTER 426
#define FS_IOC_RESVSP 0x40305828
#define FS_IOC_RESVSP64 0x4030582a

// btrfs_range_skipped says whether a range btrfs locks under the inode's
// i_mmap_lock in the native syscall whose registers are regs is one
// btrfs_range_locked leaves alone:
// - an fsync's (fsync, fdatasync, msync, and the writes and submissions
//   that make one on an O_SYNC file): btrfs_sync_file holds both locks
//   and writes back again, locking each dirty range, whose bytes were
//   reported when written (a review: 13,762 records for 1,894 fsyncs
//   beside two writers);
// - one its own hooks report with the range and mode: fallocate(2) on a
//   descriptor of inode (sys_enter_fallocate, which leaves out the
//   preallocations that change no byte; a preallocation through overlayfs
//   is left out here), the destination of
//   copy_file_range and of the clone ioctls (clone_preop); their source's
//   range is locked too, and does not change; nor does FIDEDUPERANGE or a
//   preallocation ioctl change a byte. A file named through overlayfs is
//   the overlay's inode in the syscall, not this one: its operation is
//   reported here.
static __always_inline int btrfs_range_skipped(struct pt_regs *regs, struct inode *inode)
{
	__s64 src = -1;
	__u64 nr = regs->orig_ax;
	__u32 cmd;

	switch (nr) {
	case NR_FSYNC:
	case NR_FDATASYNC:
	case NR_MSYNC:
	case NR_SYNC_FILE_RANGE:
	case NR_WRITE:
	case NR_PWRITE64:
	case NR_WRITEV:
	case NR_PWRITEV:
	case NR_PWRITEV2:
	case NR_SENDFILE:
	case NR_SPLICE:
	case NR_IO_SUBMIT:
	case NR_IO_URING_ENTER:
		return 1;
	case NR_FALLOCATE:
		// A preallocation changes no byte, through overlayfs too.
		return fd_is(regs->di, inode) || !(regs->si & FALLOC_CHANGES);
	case NR_COPY_FILE_RANGE:
		return fd_is(regs->dx, inode) || fd_is(regs->di, inode);
	case NR_IOCTL:
		break;
	default:
		return 0;
	}
	cmd = regs->si;
	switch (cmd) {
	case FIDEDUPERANGE:
	case FS_IOC_RESVSP:
	case FS_IOC_RESVSP64:
		return 1;
	case FICLONE:
		src = regs->dx;
		break;
	case FICLONERANGE:
		// struct file_clone_range begins with the source's descriptor.
		if (bpf_probe_read_user(&src, sizeof(src), (void *)regs->dx))
			src = -1;
		break;
	default:
		return 0;
	}
	return fd_is(regs->di, inode) || fd_is(src, inode);
}

// mmap_write_held says whether btrfs inode bi's i_mmap_lock is held for
// writing by task.
static __always_inline int mmap_write_held(void *bi, struct task_struct *task)
{
	struct rw_semaphore *ml;
	long owner;

	ml = CAST(bi + bpf_core_field_offset(struct btrfs_inode, i_mmap_lock), struct rw_semaphore);
	owner = ml->owner.counter;
	return !(owner & 1) && (owner & ~7L) == (long)task;
}

// btrfs_range_locked reports a range btrfs locks under the inode's
// i_mmap_lock and i_rwsem held for writing by this task (both checked by
// the caller): a range operation, whatever called it. btrfs takes that
// lock (BTRFS_ILOCK_MMAP) for fallocate in every mode, punch and zero
// range, reflinks and fsync, not for a write or a read. Reported as
// their syscalls run, range operations were missed from every other door:
// madvise(MADV_REMOVE), the preallocation ioctls (FS_IOC_UNRESVSP64,
// FS_IOC_ZERO_RANGE), a loop device's discard of an image in the tree (a
// kernel worker), a 32-bit process, overlayfs
// (TestCaptureRangeOpsBeyondFallocate).
//
// Inside a syscall whose exit flushes (flush_attrs: fallocate, ioctl,
// copy_file_range through overlayfs), a preop now and the whole range
// again as data at the exit: a clone moves the size and drops the
// destination's cached pages only after it unlocks, so bytes read at the
// lock could be the old ones, and a report cut at the size then missed
// what a clone appended (a review: TestCaptureOverlayCloneGrowingDestination).
// Anywhere else (madvise, a kernel worker, a 32-bit process) no exit is
// hooked: data at once, coalesced by chunk (btrfs locks each cached folio
// it drops, one lock a page). A punch or zero range drops the range's page
// cache before the lock and a read waits for the lock, so what is read
// after the record is the operation's; a clone made there (an in-kernel
// server's) may be read before its pages are dropped (docs/CAPTURE.md).
static __always_inline void btrfs_range_locked(struct task_struct *task, struct inode *inode,
					       __u64 start, __u64 len)
{
	struct pt_regs *regs = native_syscall_regs(task);
	struct task_ranges *tr;
	__u64 ino, end;
	__u32 dev;

	if (regs && btrfs_range_skipped(regs, inode))
		return;
	// An io-wq worker runs a request: of those, only a fallocate
	// (through overlayfs; one on this inode is io_worker_fallocate's)
	// and a madvise (MADV_REMOVE) make a range operation. Its fsync
	// writes back under the same locks (a review: 398 records for 180
	// IORING_OP_FSYNC beside two writers).
	if (task->flags & PF_IO_WORKER) {
		int op = io_worker_opcode(task);

		if (op != IORING_OP_FALLOCATE && op != IORING_OP_MADVISE)
			return;
	}
	dev = btrfs_subvol_dev(inode);
	if (!is_watched(dev))
		return;
	// Up to the largest file offset (LLONG_MAX): a range that reaches
	// past it, or wraps, ends there (a cap at 2^62 wrapped below the
	// start for a range above it, and nothing was reported: a review).
	if (start >= MAX_FILE_OFF)
		return;
	if (len > MAX_FILE_OFF - start)
		len = MAX_FILE_OFF - start;
	end = start + len;
	if (regs && in_flushed_syscall(task)) {
		tr = bpf_task_storage_get(&task_ranges, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
		if (tr) {
			ino = inode->i_ino;
			for (int i = 0; i < MAX_PENDING; i++) {
				if (i >= tr->n)
					break;
				struct pending_range *e = &tr->e[i & (MAX_PENDING - 1)];

				if (e->ino == ino && e->dev == dev) {
					if (start < e->lo)
						e->lo = start;
					if (end > e->hi)
						e->hi = end;
					return;
				}
			}
			if (tr->n < MAX_PENDING) {
				struct pending_range *e = &tr->e[tr->n & (MAX_PENDING - 1)];

				e->ino = ino;
				e->dev = dev;
				e->gen = inode->i_generation;
				e->lo = start;
				e->hi = end;
				tr->n++;
				// The journal holds the range until the inode's
				// next update, or 1 s, if the exit's record does
				// not come (a program the kernel skipped). That
				// update is reported even if a change userspace has
				// not read yet left its mark, as preop_key does: the
				// mark hid it, and a durability call waited the 1 s
				// (TestCaptureRangeLockPreopReleasedByInodeUpdate).
				struct inode_key k = {};

				k.ino = ino;
				k.dev = dev;
				bpf_map_delete_elem(&attrs, &k);
				emit(inode, dev, KIND_PREOP, 34, start, len);
				return;
			}
		}
	}
	data(inode, dev, KIND_DATA, 34, start, len);
}

// Direct loads (the arguments are BTF pointers, the others are cast): this
// fires three times per 4 KiB folio a write dirties, and each helper call
// of BPF_CORE_READ costs more than the rest. Each folio of a write is
// reported at once (a lookup of its chunk's mark, most of the time), not
// gathered until its syscall returns: completions that io_submit and
// io_uring post before they return, requests io_uring issues after the
// exit tracepoint, and an exit program the kernel skips (another BPF
// program or a bpf() map operation on the CPU) would each leave a write
// reported late or never.
SEC("tp_btf/btrfs_set_extent_bit")
int BPF_PROG(btrfs_set_extent_bit, const struct extent_io_tree *tree, u64 start,
	     u64 len, unsigned set_bits)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct task_write *tw;
	struct inode *inode;
	void *bi;
	__u64 size;
	long owner;
	__u64 root;
	__u32 dev;

	if (!(set_bits & (EXTENT_DELALLOC | EXTENT_LOCKED)) || tree->owner != IO_TREE_INODE_IO)
		return 0;
	// An inode's io_tree names its inode (the verifier types the load
	// as the union's other member, hence the cast of the address; the
	// btrfs types are a module's on most kernels, see CAST).
	bi = (void *)tree->inode;
	if (!bi)
		return 0;
	// Most LOCKED ranges are a write's folio, or a read's: of interest
	// are one to the end of the file, one in an io-wq worker, and one
	// locked under the inode's i_mmap_lock held for writing by this task
	// (btrfs_range_locked), which a write or a read does not hold (one
	// load: this fires for every folio of every write and read).
	if (!(set_bits & EXTENT_DELALLOC) && start + len != 0 && !(task->flags & PF_IO_WORKER) &&
	    !mmap_write_held(bi, task))
		return 0;
	inode = CAST(bi + bpf_core_field_offset(struct btrfs_inode, vfs_inode), struct inode);
	if (!is_btrfs_sb(inode->i_sb->s_dev))
		return 0;
	// i_rwsem held for writing by this task: a write, truncate or range
	// operation, not a page fault (page_mkwrite sets DELALLOC too, before
	// the store lands) nor a read.
	owner = inode->i_rwsem.owner.counter;
	if ((owner & 1) || (owner & ~7L) != (long)task)
		return 0;
	if (set_bits & EXTENT_DELALLOC) {
		// A buffered write (also O_DIRECT, which btrfs turns into
		// one for files with checksums), after the copy, per folio,
		// in whole blocks. Defragmentation rewrites the same bytes.
		if (set_bits & EXTENT_DEFRAG)
			return 0;
		tw = bpf_task_storage_get(&task_writes, task, 0, 0);
		dev = btrfs_dev_of(inode, tw, &root);
		if (!is_watched(dev))
			return 0;
		// In a syscall whose exit is hooked the write's mark grows
		// with each folio and lasts until the exit.
		tw = remember_write_in(task, tw, inode, dev, root, start, len, SPAN_SYSCALL);
		data_tw(inode, dev, 0, 24, start, len, tw);
		return 0;
	}
	if (start + len != 0) {
		if (!io_worker_fallocate(inode) && mmap_write_held(bi, task))
			btrfs_range_locked(task, inode, start, len);
		return 0;
	}
	// Locking from a block to the end of the file ((u64)-1, so start +
	// len wraps to 0) under the inode lock: a truncate, once i_size and
	// the page cache are cut. The tail counts as changed (see
	// ext4_truncate_enter).
	dev = btrfs_subvol_dev(inode);
	if (!is_watched(dev))
		return 0;
	size = inode->i_size;
	if (size < start)
		start = size;
	emit(inode, dev, KIND_DATA, 25, start, (1ULL << 62) - start);
	return 0;
}

SEC("tp_btf/btrfs_inode_new")
int BPF_PROG(btrfs_inode_new, struct inode *inode)
{
	__u32 dev;

	if (!watched_btrfs(inode, &dev))
		return 0;
	emit(inode, dev, KIND_NEW, 26, 0, 0);
	return 0;
}

// Syscalls (x86-64 numbers) whose exit runs flush_attrs, one bit each;
// userspace sets a bit once that exit is attached.
volatile __u64 FLUSHED_SYSCALLS[8] = {};

// in_flushed_syscall says whether task is in a syscall whose exit reports
// the inodes it updated (see may_mark for who is in no syscall).
static __always_inline int in_flushed_syscall(struct task_struct *task)
{
	return in_syscall_of(task, FLUSHED_SYSCALLS);
}

// A btrfs inode's ctime is being set: it is being updated. It is reported
// now, as ext4 and XFS report theirs: the change made so far is in
// memory, and a directory's entries are read under its lock, which the
// operation still holds. In a syscall whose exit is hooked it is reported
// again then (unless the first record is still unread), with the parts of
// the change made after the ctime (a utimensat's mtime, an unlink's link
// count). Only then, the update was lost when the exit's program did not
// run: task_work after a syscall that returned -ENOSYS (which leaves ax as
// in the syscall's body), a program the kernel skipped.
static __always_inline void ctime_set(struct inode *inode)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct task_attrs *ta;
	__u64 ino;
	__u32 dev, gen;

	// Direct loads where they can be (the argument is a BTF pointer):
	// this fires at most writes.
	if (!inode || !is_btrfs_sb(inode->i_sb->s_dev))
		return;
	dev = btrfs_subvol_dev(inode);
	if (!is_watched(dev))
		return;
	ino = inode->i_ino;
	gen = inode->i_generation;
	if (in_flushed_syscall(task)) {
		ta = bpf_task_storage_get(&task_attrs, task, 0, BPF_LOCAL_STORAGE_GET_F_CREATE);
		if (ta) {
			for (int i = 0; i < MAX_PENDING; i++) {
				if (i >= ta->n)
					break;
				if (ta->e[i].ino == ino && ta->e[i].dev == dev)
					goto now;
			}
			if (ta->n < MAX_PENDING) {
				__u32 n = ta->n;

				ta->e[n & (MAX_PENDING - 1)].ino = ino;
				ta->e[n & (MAX_PENDING - 1)].dev = dev;
				ta->e[n & (MAX_PENDING - 1)].gen = gen;
				ta->n = n + 1;
			}
		}
	}
now:
	emit_attr(dev, ino, gen, 27);
}

// inode_set_ctime_current on a multigrain filesystem (btrfs is one)
// fires one of these two, whether the time moved or not; a ctime set
// from a given value fires the third. The only update that fires none
// loses a race with another task's update of the same inode, which is
// reported after it.
SEC("tp_btf/ctime_ns_xchg")
int BPF_PROG(ctime_ns_xchg, struct inode *inode, u32 old, u32 new, u32 cur)
{
	ctime_set(inode);
	return 0;
}

SEC("tp_btf/ctime_xchg_skip")
int BPF_PROG(ctime_xchg_skip, struct inode *inode, struct timespec64 *ctime)
{
	ctime_set(inode);
	return 0;
}

// Also set when an inode is read from disk, while it is still I_NEW.
SEC("tp_btf/inode_set_ctime_to_ts")
int BPF_PROG(inode_set_ctime_to_ts, struct inode *inode, struct timespec64 *ctime)
{
	if (BPF_CORE_READ(inode, i_state) & I_NEW)
		return 0;
	ctime_set(inode);
	return 0;
}


// fd_file is the file of the current task's descriptor fd.
static __always_inline struct file *fd_file(long fd)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct file **fds, *file = NULL;

	if (fd < 0 || fd > 1 << 20)
		return NULL;
	if (fd >= BPF_CORE_READ(task, files, fdt, max_fds))
		return NULL;
	fds = BPF_CORE_READ(task, files, fdt, fd);
	if (!fds || bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]))
		return NULL;
	return file;
}

// fallocate_preop reports a range operation on a btrfs file before it
// runs; sys_exit_fallocate or io_uring_complete reports it again.
static __always_inline void fallocate_preop(struct file *file, __u64 mode, __u64 pos,
					    __u64 len, __u64 key, __u8 hook)
{
	struct inode *inode;
	__u32 dev;

	if (!(mode & FALLOC_CHANGES) || !file)
		return;
	inode = BPF_CORE_READ(file, f_inode);
	if (!watched_btrfs(inode, &dev))
		return;
	if (mode & (FALLOC_FL_COLLAPSE_RANGE | FALLOC_FL_INSERT_RANGE))
		len = ~0ULL >> 2;
	preop_key(inode, dev, pos, len, hook, key);
}

SEC("tracepoint/syscalls/sys_enter_fallocate")
int sys_enter_fallocate(struct trace_event_raw_sys_enter *ctx)
{
	fallocate_preop(fd_file(ctx->args[0]), ctx->args[1], ctx->args[2], ctx->args[3],
			bpf_get_current_pid_tgid(), 31);
	return 0;
}

// io_uring's fallocate runs in an io-wq worker, in no syscall: its range
// is in the request the worker runs. Reported at the first extent lock of
// the operation (btrfs locks a range before it changes any of it), and
// again when the request completes.
// It returns whether the worker runs an IORING_OP_FALLOCATE on a file
// of inode (reported so, and again at its completion); any other range
// operation of a worker (IORING_OP_MADVISE's MADV_REMOVE, a fallocate
// through overlayfs) is btrfs_range_locked's.
// io_worker_req is the request an io-wq worker runs, or NULL.
static __always_inline struct io_kiocb *io_worker_req(struct task_struct *task)
{
	struct io_worker *worker;
	struct io_wq_work *work;

	if (!(BPF_CORE_READ(task, flags) & PF_IO_WORKER))
		return NULL;
	worker = BPF_CORE_READ(task, worker_private);
	work = BPF_CORE_READ(worker, cur_work);
	if (!work)
		return NULL;
	return (void *)work - bpf_core_field_offset(struct io_kiocb, work);
}

static __always_inline int io_worker_opcode(struct task_struct *task)
{
	struct io_kiocb *req = io_worker_req(task);

	return req ? BPF_CORE_READ(req, opcode) : -1;
}

static __always_inline int io_worker_fallocate(struct inode *inode)
{
	struct io_kiocb *req = io_worker_req(bpf_get_current_task_btf());
	struct io_sync *sync;
	struct file *file;
	__u64 key;

	if (!req || BPF_CORE_READ(req, opcode) != IORING_OP_FALLOCATE)
		return 0;
	file = BPF_CORE_READ(req, file);
	if (!file || BPF_CORE_READ(file, f_inode) != inode)
		return 0;
	key = (__u64)req;
	if (bpf_map_lookup_elem(&fallocs, &key))
		return 1; // reported at its first lock
	sync = (void *)&req->cmd;
	fallocate_preop(file, BPF_CORE_READ(sync, mode),
			BPF_CORE_READ(sync, off), BPF_CORE_READ(sync, len), key, 29);
	return 1;
}

SEC("tp_btf/io_uring_complete")
int BPF_PROG(io_uring_complete, struct io_ring_ctx *ring, void *req,
	     struct io_uring_cqe *cqe)
{
	__u64 key = (__u64)req;
	struct falloc *fa = bpf_map_lookup_elem(&fallocs, &key);

	if (!fa)
		return 0;
	emit_raw(fa->dev, fa->ino, fa->gen, KIND_DATA, 30, fa->pos, fa->len);
	bpf_map_delete_elem(&fallocs, &key);
	return 0;
}

// clone_preop reports the destination range of a clone or copy before it
// runs; sys_exit_fallocate (attached to these syscalls' exits) reports it
// again.
static __always_inline void clone_preop(struct file *file, __u64 pos, __u64 len, __u8 hook)
{
	struct inode *inode;
	__u32 dev;

	if (!file)
		return;
	inode = BPF_CORE_READ(file, f_inode);
	if (!watched_btrfs(inode, &dev))
		return;
	if (len == 0 || len > ~0ULL >> 2)
		len = ~0ULL >> 2;
	preop_key(inode, dev, pos, len, hook, bpf_get_current_pid_tgid());
}

// copy_file_range within btrfs shares extents (a clone): no write.
SEC("tracepoint/syscalls/sys_enter_copy_file_range")
int sys_enter_copy_file_range(struct trace_event_raw_sys_enter *ctx)
{
	struct file *file = fd_file(ctx->args[2]);
	__u64 *off_out = (__u64 *)ctx->args[3];
	__u64 pos, len = ctx->args[4];

	if (!file)
		return 0;
	if (!off_out)
		pos = BPF_CORE_READ(file, f_pos);
	else if (bpf_probe_read_user(&pos, sizeof(pos), off_out))
		pos = 0, len = 0; // unreadable here: the whole file
	clone_preop(file, pos, len, 32);
	return 0;
}

// FICLONE (the whole file) and FICLONERANGE. Every ioctl of the machine
// comes here: the command is compared first.
SEC("tracepoint/syscalls/sys_enter_ioctl")
int sys_enter_ioctl(struct trace_event_raw_sys_enter *ctx)
{
	unsigned int cmd = ctx->args[1];
	struct file_clone_range r = {};

	if (cmd == FICLONE) {
		clone_preop(fd_file(ctx->args[0]), 0, 0, 33);
		return 0;
	}
	if (cmd != FICLONERANGE)
		return 0;
	if (bpf_probe_read_user(&r, sizeof(r), (void *)ctx->args[2]))
		r.dest_offset = 0, r.src_length = 0;
	clone_preop(fd_file(ctx->args[0]), r.dest_offset, r.src_length, 33);
	return 0;
}

// The exit of every other syscall that updates inodes (truncate, rename,
// link, unlink, mkdir, mknod, symlink, chmod, chown, utimes, xattrs, open
// with O_CREAT or O_TRUNC): see ctime_set.
SEC("tracepoint/syscalls/sys_exit_rename")
int sys_exit_attrs(struct trace_event_raw_sys_exit *ctx)
{
	flush_attrs();
	return 0;
}
