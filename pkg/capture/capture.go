// Package capture loads duet's tracepoint programs and reads the records
// they emit: which byte ranges and which inodes changed on the watched
// filesystems.
package capture

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"
)

// Kind says what a record reports.
type Kind uint8

// Record kinds, as emitted by bpf/capture.bpf.c.
const (
	KindData  Kind = 1 // bytes [Pos, Pos+Len) changed and are readable now
	KindMmap  Kind = 2 // a page went dirty through a fault: write back, then read
	KindAttr  Kind = 3 // inode metadata or directory entries changed
	KindPreop Kind = 4 // [Pos, Pos+Len) is about to change: read after the next KindAttr
	KindNew   Kind = 5 // a new inode: an older inode with this number is gone
)

func (k Kind) String() string {
	switch k {
	case KindData:
		return "data"
	case KindMmap:
		return "mmap"
	case KindAttr:
		return "attr"
	case KindPreop:
		return "preop"
	case KindNew:
		return "new"
	}
	return fmt.Sprintf("kind(%d)", uint8(k))
}

// maxWatched is MAX_WATCHED in bpf/capture.bpf.c.
const maxWatched = 8

// ChunkShift is log2 of the in-kernel coalescing chunk (CHUNK_SHIFT in
// bpf/capture.bpf.c).
const ChunkShift = 20

// Record is one change reported by the kernel.
type Record struct {
	Seq  uint64
	Ino  uint64
	Pos  uint64
	Len  uint64
	Dev  uint32 // kernel dev_t encoding, see KernelDev
	Gen  uint32
	Kind Kind
	Hook uint8 // which program emitted it (numbers in bpf/capture.bpf.c)
	// End is the ring buffer's position past the record (set by Read):
	// every record reserved before it was read before it (Reserved).
	End uint64
}

const recordSize = 48

// InodeKey names an inode on a watched device.
type InodeKey struct {
	Dev uint32
	Ino uint64
}

// HookStatus reports how one hook was attached.
type HookStatus struct {
	Name   string `json:"name"`
	Type   string `json:"type"`
	Active bool   `json:"active"`
	Error  string `json:"error,omitempty"`
}

// Capture owns the loaded programs, their links and the ring buffer reader.
type Capture struct {
	objs   CaptureObjects
	links  []link.Link
	reader *eventRing
	hooks  []HookStatus
	xfs    bool // Options.XFS
	btrfs  bool // Options.Btrfs holds a superblock

	// ctr is the counters map mapped read-only (Counters); nil once
	// closed, under ctrMu.
	ctrMu sync.RWMutex
	ctr   []byte
	// epoch is the forget epoch (forget_epoch) mapped writable: each
	// ForgetChunks adds one after its deletes. nil once closed, under
	// ctrMu.
	epoch []byte

	mu     sync.Mutex
	rbuf   []byte // the last record read, under Read's caller
	closed bool
	// stopped: StopReading was called (the reader is closed).
	stopped bool
}

// KernelDev converts a stat(2) st_dev to the kernel's internal dev_t
// (major << 20 | minor), which is what s_dev holds.
func KernelDev(stDev uint64) uint32 {
	return unix.Major(stDev)<<20 | unix.Minor(stDev)
}

// Options configure Open.
type Options struct {
	// Devices are the watched filesystems, as stat(2) st_dev values.
	Devices []uint64
	// RingBytes is the ring buffer size (a power of two, at least a page).
	RingBytes uint32
	// XFS says a watched filesystem is XFS: its hooks are attached too.
	XFS bool
	// Btrfs are the superblocks of the watched btrfs filesystems (see
	// BtrfsSuperblock), whose hooks are then attached too. Devices
	// holds their subvolumes' devices, as stat(2) reports them.
	Btrfs []uint64
}

// Open loads the programs, registers the watched devices and attaches every
// hook. A required hook that fails to attach is an error naming it.
func Open(opts Options) (*Capture, error) {
	c, err := Load(opts)
	if err != nil {
		return nil, err
	}
	if err := c.Attach(); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// Load loads and verifies the programs and creates the maps, without
// attaching anything. Verification is most of Open's time (0.6 to 0.9 s
// here), so a secondary loads ahead and only attaches when it takes over.
func Load(opts Options) (*Capture, error) {
	if err := ensureMounts(); err != nil {
		return nil, err
	}
	if err := rlimit.RemoveMemlock(); err != nil {
		return nil, fmt.Errorf("raising memlock limit: %w", err)
	}
	spec, err := LoadCapture()
	if err != nil {
		return nil, fmt.Errorf("loading BPF spec: %w", err)
	}
	if opts.RingBytes != 0 {
		if opts.RingBytes&(opts.RingBytes-1) != 0 || opts.RingBytes < 4096 {
			return nil, fmt.Errorf("ring buffer size %d: must be a power of two of at least 4096", opts.RingBytes)
		}
		spec.Maps["events"].MaxEntries = opts.RingBytes
	}
	ring := spec.Maps["events"].MaxEntries
	if err := spec.Variables["RING_WAKE_BYTES"].Set(uint64(ring / 8)); err != nil {
		return nil, fmt.Errorf("setting wake-up threshold: %w", err)
	}
	for _, v := range []struct {
		name string
		devs []uint64
	}{{"WATCHED_DEVS", opts.Devices}, {"BTRFS_SBS", opts.Btrfs}} {
		if len(v.devs) > maxWatched {
			return nil, fmt.Errorf("%d watched filesystems: at most %d are supported", len(v.devs), maxWatched)
		}
		var devs [maxWatched]uint32
		for i, d := range v.devs {
			devs[i] = KernelDev(d)
		}
		if err := spec.Variables[v.name].Set(devs); err != nil {
			return nil, fmt.Errorf("setting watched devices (%s): %w", v.name, err)
		}
	}
	if err := spec.Variables["OVL_FILE_PRIV"].Set(boolWord(kernelAtLeast(6, 13))); err != nil {
		return nil, fmt.Errorf("setting overlayfs's private data layout: %w", err)
	}
	if !opts.XFS {
		withoutPrefix(spec, "xfs_")
	}
	if len(opts.Btrfs) == 0 {
		withoutPrefix(spec, "btrfs_")
	}
	c := &Capture{xfs: opts.XFS, btrfs: len(opts.Btrfs) > 0}
	if err := spec.LoadAndAssign(&c.objs, nil); err != nil {
		var verr *ebpf.VerifierError
		if errors.As(err, &verr) {
			return nil, fmt.Errorf("loading BPF programs (verifier): %+v", verr)
		}
		return nil, fmt.Errorf("loading BPF programs: %w", err)
	}
	ctr, err := mapWords(c.objs.Counters, "counters", ctrMax, unix.PROT_READ)
	if err != nil {
		c.objs.Close()
		return nil, err
	}
	c.ctr = ctr
	if c.epoch, err = mapWords(c.objs.ForgetEpoch, "forget epoch", 1, unix.PROT_READ|unix.PROT_WRITE); err != nil {
		unix.Munmap(ctr)
		c.objs.Close()
		return nil, err
	}
	return c, nil
}

// The counters, in their map's order (bpf/capture.bpf.c, CTR_*).
const (
	ctrSeq = iota
	ctrLost
	ctrRescan
	ctrDioFull
	ctrMax = 4
)

// mapWords maps an array map of n 8-byte words (BPF_F_MMAPABLE), what
// names it in errors. The counters are mapped read-only: a durability
// call reads them with loads, not three bpf() syscalls. The forget epoch
// is writable: ForgetChunks adds to it with an atomic instruction, which
// also orders the deletes before it.
func mapWords(m *ebpf.Map, what string, n uint32, prot int) ([]byte, error) {
	if m.MaxEntries() != n || m.ValueSize() != 8 {
		return nil, fmt.Errorf("capture %s: %d entries of %d bytes, want %d of 8", what, m.MaxEntries(), m.ValueSize(), n)
	}
	size := (int(n)*8 + os.Getpagesize() - 1) &^ (os.Getpagesize() - 1)
	b, err := unix.Mmap(m.FD(), 0, size, prot, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("mapping the capture %s (BPF_F_MMAPABLE, Linux 5.5 or later): %w", what, err)
	}
	return b, nil
}

// withoutPrefix replaces the programs of one filesystem (those attached
// to tracepoints named with prefix, which name its types) by stubs that
// load on any kernel: where XFS or btrfs is a module not loaded, its
// types are missing and the whole collection would fail to load, ext4
// capture included. They are attached only when that filesystem is
// watched (Attach).
func withoutPrefix(spec *ebpf.CollectionSpec, prefix string) {
	for name, p := range spec.Programs {
		if !strings.HasPrefix(p.AttachTo, prefix) {
			continue
		}
		spec.Programs[name] = &ebpf.ProgramSpec{
			Name:       p.Name,
			Type:       ebpf.Tracing,
			AttachType: ebpf.AttachTraceRawTp,
			AttachTo:   "writeback_dirty_folio",
			License:    p.License,
			Instructions: asm.Instructions{
				asm.Mov.Imm(asm.R0, 0),
				asm.Return(),
			},
		}
	}
}

// Attach attaches every hook and opens the ring buffer; from then on
// records flow. On error the caller closes c.
func (c *Capture) Attach() error {
	hooks, exitOf, flushes := c.plan()
	var marked, flushed [8]uint64
	for _, h := range hooks {
		if skipHook != nil && skipHook(h.name) {
			continue
		}
		st := HookStatus{Name: h.name, Type: h.typ()}
		var l link.Link
		var err error
		if group, name, ok := strings.Cut(h.name, "/"); ok {
			l, err = link.Tracepoint(group, name, h.prog, nil)
		} else {
			l, err = link.AttachTracing(link.TracingOptions{Program: h.prog})
		}
		if err != nil {
			st.Error = err.Error()
			c.hooks = append(c.hooks, st)
			if h.required {
				return fmt.Errorf("attaching %s/%s: %w", st.Type, h.name, err)
			}
			continue
		}
		st.Active = true
		c.links = append(c.links, l)
		c.hooks = append(c.hooks, st)
		if nr, ok := exitOf[h.name]; ok {
			marked[nr/64] |= 1 << (nr % 64)
		}
		if nr, ok := flushes[h.name]; ok {
			flushed[nr/64] |= 1 << (nr % 64)
		}
	}
	// Only now: a mark made in a syscall whose exit is not attached yet
	// would outlive the syscall, and so would an inode kept for its exit.
	if err := c.objs.MARKED_SYSCALLS.Set(marked); err != nil {
		return fmt.Errorf("setting the syscalls whose write_end is marked: %w", err)
	}
	if err := c.objs.FLUSHED_SYSCALLS.Set(flushed); err != nil {
		return fmt.Errorf("setting the syscalls that report the inodes they updated: %w", err)
	}
	var err error
	c.reader, err = newEventRing(c.objs.Events)
	if err != nil {
		return fmt.Errorf("opening ring buffer: %w", err)
	}
	return nil
}

// skipHook, set by benchmarks only, leaves the hooks it names unattached:
// what each costs is the difference it makes.
var skipHook func(name string) bool

// hook is a program and where Attach attaches it: a tracepoint
// ("group/name") or a BTF-typed one (a bare name).
type hook struct {
	name     string
	prog     *ebpf.Program
	required bool
}

func (h hook) typ() string {
	if strings.Contains(h.name, "/") {
		return "tracepoint"
	}
	return "tp_btf"
}

// PlannedHook is a hook Attach would attach.
type PlannedHook struct {
	Name     string
	Type     string // tracepoint or tp_btf
	Required bool   // else the kernel may lack it, and capture goes on without it
}

// Planned lists the hooks Attach would attach, in order, without
// attaching any (duet run --check shows them).
func (c *Capture) Planned() []PlannedHook {
	hooks, _, _ := c.plan()
	out := make([]PlannedHook, len(hooks))
	for i, h := range hooks {
		out[i] = PlannedHook{Name: h.name, Type: h.typ(), Required: h.required}
	}
	return out
}

// plan returns the hooks to attach, the syscalls whose write_end marks are
// kept (exitOf) and those whose exits flush inode updates (flushes), by
// hook name.
func (c *Capture) plan() (hooks []hook, exitOf, flushes map[string]int) {
	// Every program of bpf/capture.bpf.c; those not required may be
	// missing on other kernels, which status then shows.
	hooks = []hook{
		{"ext4_da_write_end", c.objs.Ext4DaWriteEnd, true},
		{"ext4_write_end", c.objs.Ext4WriteEnd, true},
		{"ext4_journalled_write_end", c.objs.Ext4JournalledWriteEnd, false},
		{"writeback_dirty_folio", c.objs.WritebackDirtyFolio, true},
		{"iomap_dio_complete", c.objs.IomapDioComplete, true},
		{"iomap_dio_rw_begin", c.objs.IomapDioRwBegin, true},
		{"ext4_mark_inode_dirty", c.objs.Ext4MarkInodeDirty, true},
		{"ext4_punch_hole", c.objs.Ext4PunchHole, true},
		{"ext4_zero_range", c.objs.Ext4ZeroRange, true},
		{"ext4_collapse_range", c.objs.Ext4CollapseRange, false},
		{"ext4_insert_range", c.objs.Ext4InsertRange, false},
		{"ext4_allocate_inode", c.objs.Ext4AllocateInode, true},
		{"syscalls/sys_enter_mmap", c.objs.SysEnterMmap, true},
		{"syscalls/sys_exit_fallocate", c.objs.SysExitFallocate, true},
		{"ext4_truncate_enter", c.objs.Ext4TruncateEnter, true},
	}
	if c.xfs {
		// XFS (docs/CAPTURE.md): iomap for buffered writes and
		// zeroing, transaction commits for inodes, range operations
		// reported again when their call returns. Only when XFS is
		// watched: the ioctl exit fires for every ioctl of the machine.
		hooks = append(hooks, []hook{
			{"iomap_iter", c.objs.IomapIter, true},
			{"xfs_trans_commit", c.objs.XfsTransCommit, true},
			{"xfs_itruncate_extents_start", c.objs.XfsItruncateExtentsStart, true},
			{"xfs_free_file_space", c.objs.XfsFreeFileSpace, true},
			{"xfs_collapse_file_space", c.objs.XfsCollapseFileSpace, true},
			{"xfs_insert_file_space", c.objs.XfsInsertFileSpace, true},
			{"xfs_reflink_remap_range", c.objs.XfsReflinkRemapRange, true},
			{"xfs_exchrange_mappings", c.objs.XfsExchrangeMappings, true},
		}...)
	}
	if c.btrfs {
		// btrfs (docs/CAPTURE.md): extent bits for buffered writes
		// and truncation, ctime updates for inodes (reported when
		// their syscall returns), range operations by their syscalls
		// and io_uring requests (the completion is not required: a
		// kernel without io_uring has none).
		hooks = append(hooks, []hook{
			{"btrfs_set_extent_bit", c.objs.BtrfsSetExtentBit, true},
			{"btrfs_inode_new", c.objs.BtrfsInodeNew, true},
			{"ctime_ns_xchg", c.objs.CtimeNsXchg, true},
			{"ctime_xchg_skip", c.objs.CtimeXchgSkip, true},
			{"inode_set_ctime_to_ts", c.objs.InodeSetCtimeToTs, true},
			{"io_uring_complete", c.objs.IoUringComplete, false},
			{"syscalls/sys_enter_fallocate", c.objs.SysEnterFallocate, true},
			{"syscalls/sys_enter_copy_file_range", c.objs.SysEnterCopyFileRange, true},
			{"syscalls/sys_enter_ioctl", c.objs.SysEnterIoctl, true},
		}...)
	}
	// Exits that flush_attrs runs in (FLUSHED_SYSCALLS), by name.
	flushes = map[string]int{"syscalls/sys_exit_fallocate": unix.SYS_FALLOCATE}
	if c.xfs || c.btrfs {
		// Reflinks and range exchanges, reported again on return.
		hooks = append(hooks, []hook{
			{"syscalls/sys_exit_ioctl", c.objs.SysExitFallocate, true},
			{"syscalls/sys_exit_copy_file_range", c.objs.SysExitFallocate, true},
		}...)
		flushes["syscalls/sys_exit_ioctl"] = unix.SYS_IOCTL
	}
	if c.btrfs {
		// The other syscalls that update inodes: on btrfs their
		// updates are reported when they return. Those added to
		// Linux lately are not required.
		for _, sc := range []struct {
			name     string
			nr       int
			required bool
		}{
			{"truncate", unix.SYS_TRUNCATE, true}, {"ftruncate", unix.SYS_FTRUNCATE, true},
			{"open", unix.SYS_OPEN, true}, {"openat", unix.SYS_OPENAT, true},
			{"openat2", unix.SYS_OPENAT2, false}, {"creat", unix.SYS_CREAT, true},
			{"open_by_handle_at", unix.SYS_OPEN_BY_HANDLE_AT, false},
			{"rename", unix.SYS_RENAME, true}, {"renameat", unix.SYS_RENAMEAT, true},
			{"renameat2", unix.SYS_RENAMEAT2, true},
			{"link", unix.SYS_LINK, true}, {"linkat", unix.SYS_LINKAT, true},
			{"unlink", unix.SYS_UNLINK, true}, {"unlinkat", unix.SYS_UNLINKAT, true},
			{"rmdir", unix.SYS_RMDIR, true},
			{"mkdir", unix.SYS_MKDIR, true}, {"mkdirat", unix.SYS_MKDIRAT, true},
			{"mknod", unix.SYS_MKNOD, true}, {"mknodat", unix.SYS_MKNODAT, true},
			{"symlink", unix.SYS_SYMLINK, true}, {"symlinkat", unix.SYS_SYMLINKAT, true},
			{"chmod", unix.SYS_CHMOD, true}, {"fchmod", unix.SYS_FCHMOD, true},
			{"fchmodat", unix.SYS_FCHMODAT, true}, {"fchmodat2", unix.SYS_FCHMODAT2, false},
			{"chown", unix.SYS_CHOWN, true}, {"fchown", unix.SYS_FCHOWN, true},
			{"lchown", unix.SYS_LCHOWN, true}, {"fchownat", unix.SYS_FCHOWNAT, true},
			{"utime", unix.SYS_UTIME, true}, {"utimes", unix.SYS_UTIMES, true},
			{"futimesat", unix.SYS_FUTIMESAT, true}, {"utimensat", unix.SYS_UTIMENSAT, true},
			{"setxattr", unix.SYS_SETXATTR, true}, {"lsetxattr", unix.SYS_LSETXATTR, true},
			{"fsetxattr", unix.SYS_FSETXATTR, true}, {"setxattrat", unix.SYS_SETXATTRAT, false},
			{"removexattr", unix.SYS_REMOVEXATTR, true}, {"lremovexattr", unix.SYS_LREMOVEXATTR, true},
			{"fremovexattr", unix.SYS_FREMOVEXATTR, true}, {"removexattrat", unix.SYS_REMOVEXATTRAT, false},
			{"file_setattr", unix.SYS_FILE_SETATTR, false},
		} {
			name := "syscalls/sys_exit_" + sc.name
			hooks = append(hooks, hook{name, c.objs.SysExitAttrs, sc.required})
			flushes[name] = sc.nr
		}
	}
	// The exits of the syscalls that write through the page cache; one
	// program. Those not built into this kernel are left out. A
	// write_end leaves its mark only in a syscall whose exit is attached
	// (MARKED_SYSCALLS, by number).
	exitOf = map[string]int{}
	for _, sc := range []struct {
		name     string
		nr       int
		required bool
	}{
		{"write", unix.SYS_WRITE, true}, {"pwrite64", unix.SYS_PWRITE64, true},
		{"writev", unix.SYS_WRITEV, true}, {"pwritev", unix.SYS_PWRITEV, true},
		{"pwritev2", unix.SYS_PWRITEV2, true}, {"sendfile64", unix.SYS_SENDFILE, false},
		{"splice", unix.SYS_SPLICE, false}, {"copy_file_range", unix.SYS_COPY_FILE_RANGE, false},
		{"io_uring_enter", unix.SYS_IO_URING_ENTER, false}, {"io_submit", unix.SYS_IO_SUBMIT, false},
	} {
		name := "syscalls/sys_exit_" + sc.name
		hooks = append(hooks, hook{name, c.objs.SysExitWriteFamily, sc.required})
		exitOf[name] = sc.nr
		// io_submit and io_uring_enter post completions before they
		// return (another thread reaps them meanwhile): an inode update
		// they make is reported at once, not at their exit.
		if sc.nr != unix.SYS_IO_SUBMIT && sc.nr != unix.SYS_IO_URING_ENTER {
			flushes[name] = sc.nr
		}
	}
	return hooks, exitOf, flushes
}

// ensureMounts mounts bpffs and tracefs when they are missing; tools and
// classic tracepoints expect them.
func ensureMounts() error {
	for _, m := range []struct{ path, fstype string }{
		{"/sys/fs/bpf", "bpf"},
		{"/sys/kernel/tracing", "tracefs"},
	} {
		var st unix.Statfs_t
		if err := unix.Statfs(m.path, &st); err != nil {
			continue
		}
		want := map[string]int64{"bpf": unix.BPF_FS_MAGIC, "tracefs": unix.TRACEFS_MAGIC}[m.fstype]
		if st.Type == want {
			continue
		}
		if err := unix.Mount(m.fstype, m.path, m.fstype, 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return fmt.Errorf("mounting %s on %s: %w", m.fstype, m.path, err)
		}
	}
	return nil
}

// Hooks reports how each hook was attached.
func (c *Capture) Hooks() []HookStatus { return c.hooks }

// PollInterval bounds how long a record waits in the ring buffer: the
// kernel side wakes the reader only when the ring starts to fill.
const PollInterval = 2 * time.Millisecond

// Read blocks until a record arrives. It returns os.ErrClosed after Close.
func (c *Capture) Read(r *Record) error {
	for {
		var err error
		c.rbuf, err = c.reader.read(c.rbuf, time.Now().Add(PollInterval))
		if errors.Is(err, os.ErrDeadlineExceeded) || errors.Is(err, errFlushed) {
			continue
		}
		if err != nil {
			return err
		}
		r.End = c.reader.end
		return decodeRecord(c.rbuf, r)
	}
}

// Reserved returns the ring buffer's producer position: every record
// reserved so far ends at or before it, and a record whose End reaches it
// was read after all of them. A barrier waits for the records reserved
// before the call by position, not by the kernel's sequence: a record is
// numbered after its reservation, so two CPUs can reserve in one order and
// number in the other, and the first S records read need not be those
// numbered 1..S (from a review: 24 such inversions in 400,000 records).
func (c *Capture) Reserved() (uint64, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.stopped || c.reader == nil {
		return 0, fmt.Errorf("reading the capture ring's position: %w", os.ErrClosed)
	}
	return c.reader.reserved(), nil
}

// Kick makes a blocked Read return what is in the ring buffer now instead
// of at its next poll: for a barrier, which waits for every record.
func (c *Capture) Kick() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if !c.closed && !c.stopped {
		c.reader.kick()
	}
}

// SetEagerWake makes every record wake the reader (on) or only a filling
// ring buffer (off, the default). Eager suits synchronous writers, whose
// barrier waits for the reader; off suits throughput.
func (c *Capture) SetEagerWake(on bool) error {
	var v uint32
	if on {
		v = 1
	}
	return c.objs.EAGER_WAKE.Set(v)
}

// Buffered reports the bytes waiting in the ring buffer; 0 once closed
// (duet status may ask while the node leaves the primary role: the closed
// reader's ring is gone, and reading it crashed the daemon).
func (c *Capture) Buffered() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed || c.stopped || c.reader == nil {
		return 0
	}
	return c.reader.available()
}

func decodeRecord(b []byte, r *Record) error {
	if len(b) < recordSize {
		return fmt.Errorf("short capture record: %d bytes", len(b))
	}
	le := binary.LittleEndian
	r.Seq = le.Uint64(b[0:])
	r.Ino = le.Uint64(b[8:])
	r.Pos = le.Uint64(b[16:])
	r.Len = le.Uint64(b[24:])
	r.Dev = le.Uint32(b[32:])
	r.Gen = le.Uint32(b[36:])
	r.Kind = Kind(b[40])
	r.Hook = b[41]
	return nil
}

// ForgetChunks drops the in-flight marks of chunks so that the next write to
// them emits a new record. Call it before reading their bytes. Keys without
// a mark are skipped: every other key is deleted whatever their order.
//
// It then moves the forget epoch, before the caller reads anything: a
// btrfs writer keeps the last mark it found in its task's storage and
// skips the lookup while the epoch stands (data_tw in
// bpf/capture.bpf.c), so the marks are gone for it only once the epoch
// moved.
func (c *Capture) ForgetChunks(keys []CaptureChunkKey) error {
	defer c.nextEpoch()
	for len(keys) > 0 {
		n, err := c.objs.Chunks.BatchDelete(keys, nil)
		if err == nil {
			return nil
		}
		if !errors.Is(err, ebpf.ErrKeyNotExist) {
			// No batch support: one at a time.
			for i := range keys {
				_ = c.objs.Chunks.Delete(&keys[i])
			}
			return nil
		}
		// keys[n] has no mark (a batch stops there): go on after it.
		keys = keys[n+1:]
	}
	return nil
}

// nextEpoch adds one to the forget epoch (a locked instruction: a full
// barrier between the deletes before it and the reads after it).
func (c *Capture) nextEpoch() {
	c.ctrMu.RLock()
	defer c.ctrMu.RUnlock()
	if c.epoch != nil {
		atomic.AddUint64((*uint64)(unsafe.Pointer(&c.epoch[0])), 1)
	}
}

// Marks lists the in-flight marks: the inodes with an ATTR mark and the
// chunks with a data mark. With the ring drained and the sequence
// unchanged since, every mark listed should have a change waiting in user
// space to forget it (node's auditMarks).
func (c *Capture) Marks() (attrs []InodeKey, chunks []CaptureChunkKey, err error) {
	var ik CaptureInodeKey
	var iv uint8
	it := c.objs.Attrs.Iterate()
	for it.Next(&ik, &iv) {
		attrs = append(attrs, InodeKey{Dev: ik.Dev, Ino: ik.Ino})
	}
	if err := it.Err(); err != nil {
		return nil, nil, fmt.Errorf("reading the attribute marks: %w", err)
	}
	var ck CaptureChunkKey
	var cv uint64
	it = c.objs.Chunks.Iterate()
	for it.Next(&ck, &cv) {
		chunks = append(chunks, ck)
	}
	if err := it.Err(); err != nil {
		return nil, nil, fmt.Errorf("reading the data marks: %w", err)
	}
	return attrs, chunks, nil
}

// PlantAttrMark sets inode k's attribute mark as the BPF code does for a
// record in flight, without the record: the mark a bug would leave stuck.
// For tests of the node's audit of stuck marks only.
func (c *Capture) PlantAttrMark(k InodeKey) error {
	ik := CaptureInodeKey{Dev: k.Dev, Ino: k.Ino}
	return c.objs.Attrs.Put(&ik, uint8(1))
}

// ForgetAttr drops the in-flight ATTR mark of an inode. Call it before
// reading the inode's metadata.
func (c *Capture) ForgetAttr(k InodeKey) {
	ik := CaptureInodeKey{Dev: k.Dev, Ino: k.Ino}
	_ = c.objs.Attrs.Delete(&ik)
}

// Counters are the kernel-side totals.
type Counters struct {
	Seq    uint64 `json:"seq"`
	Lost   uint64 `json:"lost"`
	Rescan uint64 `json:"rescan"`
	// DioFull counts O_DIRECT writes that found the map of writes in
	// flight full: from the first, every O_DIRECT completion on a file
	// open for writing, reads too, is shipped as a change (bpf/capture.bpf.c).
	DioFull uint64 `json:"dio_full,omitempty"`
}

// Counters reads the kernel-side totals: the sequence first, then the
// loss count (a barrier's order, see Drain in pkg/node), each an atomic
// load of the word the BPF programs add to.
func (c *Capture) Counters() (Counters, error) {
	c.ctrMu.RLock()
	defer c.ctrMu.RUnlock()
	if c.ctr == nil {
		return Counters{}, fmt.Errorf("reading the capture counters: %w", os.ErrClosed)
	}
	load := func(i int) uint64 { return atomic.LoadUint64((*uint64)(unsafe.Pointer(&c.ctr[8*i]))) }
	return Counters{Seq: load(ctrSeq), Lost: load(ctrLost), Rescan: load(ctrRescan), DioFull: load(ctrDioFull)}, nil
}

// TakeOverflow returns and clears the inodes whose records were lost.
func (c *Capture) TakeOverflow() ([]InodeKey, error) {
	var out []InodeKey
	var k CaptureInodeKey
	var v uint8
	it := c.objs.Overflow.Iterate()
	var keys []CaptureInodeKey
	for it.Next(&k, &v) {
		keys = append(keys, k)
	}
	if err := it.Err(); err != nil {
		return nil, fmt.Errorf("reading overflow map: %w", err)
	}
	for i := range keys {
		// Delete before the caller rescans, so a later loss marks again.
		_ = c.objs.Overflow.Delete(&keys[i])
		_ = c.objs.Attrs.Delete(&keys[i])
		out = append(out, InodeKey{Dev: keys[i].Dev, Ino: keys[i].Ino})
	}
	return out, nil
}

// ResetRescan clears the whole-tree rescan counter after a rescan started.
func (c *Capture) ResetRescan() error {
	return c.objs.Counters.Put(uint32(ctrRescan), uint64(0))
}

// Close detaches every hook and frees the maps. Safe to call twice.
func (c *Capture) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return nil
	}
	c.closed = true
	if c.reader != nil {
		c.reader.close()
	}
	c.ctrMu.Lock()
	if c.ctr != nil {
		unix.Munmap(c.ctr)
		c.ctr = nil
	}
	if c.epoch != nil {
		unix.Munmap(c.epoch)
		c.epoch = nil
	}
	c.ctrMu.Unlock()
	// A syscall tracepoint's link takes about 60 ms to release here (the
	// kernel waits for a grace period); released together, their waits
	// partly overlap: 0.5 s for this kernel's hooks, not 0.9 s.
	var wg sync.WaitGroup
	for _, l := range c.links {
		wg.Go(func() { l.Close() })
	}
	wg.Wait()
	return c.objs.Close()
}

// StopReading ends Read for good (it returns os.ErrClosed) at once,
// leaving the hooks attached until Close, which takes a while: a node
// leaving the primary role stops reading, and lets the peer serve before
// the hooks are gone.
func (c *Capture) StopReading() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stopped = true
	if c.reader != nil {
		c.reader.close()
	}
}

// Stopped reports whether StopReading or Close was called: no record
// will be read any more.
func (c *Capture) Stopped() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stopped || c.closed
}

// kernelAtLeast says whether the running kernel's release is major.minor
// or later ("6.18.44-fc" is 6.18); an unreadable release counts as new.
func kernelAtLeast(major, minor int) bool {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return true
	}
	var ma, mi int
	if n, _ := fmt.Sscanf(unix.ByteSliceToString(u.Release[:]), "%d.%d", &ma, &mi); n != 2 {
		return true
	}
	return ma > major || ma == major && mi >= minor
}

func boolWord(b bool) uint32 {
	if b {
		return 1
	}
	return 0
}
