package capture

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"
	"unsafe"

	"github.com/cilium/ebpf"
	"github.com/duet-ha/duet/pkg/loopfs"
	"golang.org/x/sys/unix"
)

// inodeGen is a file's i_generation (FS_IOC_GETVERSION).
func inodeGen(t *testing.T, f *os.File) uint32 {
	t.Helper()
	var g uint64
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), 0x80087601, uintptr(unsafe.Pointer(&g))); e != 0 {
		t.Fatalf("FS_IOC_GETVERSION: %v", e)
	}
	return uint32(g)
}

// TestBtrfsDevOfStaleMarkSnapshot: btrfs_dev_of takes a btrfs folio's
// subvolume device from the task's write mark when the mark is live
// (ts != 0) and names the same inode by address, number and generation.
// A live mark outlives its syscall whenever the exit program is skipped
// (a classic tracepoint program does not run while another BPF program
// or a bpf() map operation holds bpf_prog_active on the CPU, e.g. the
// daemon's own ForgetChunks/ForgetAttr preempted there) and, for kernel
// threads without a user mm (nfsd, loop workers: SPAN_ONE), until a
// clean folio of its range goes dirty. A snapshot's files have the inode
// numbers and generations of its source's, so only the address has to
// match: the source's inode freed (here: unlinked) and the snapshot's
// allocated next on the same CPU, which the slab's per-CPU freelist
// (last freed, first allocated) makes the rule. The snapshot's write is
// then taken for the gone source file's: no record with the snapshot's
// device (here it was even suppressed by the source file's chunk mark:
// no record at all).
//
// The test sets ts in the mark the source file's write left (standing
// for the skipped exit); the rest is what the kernel does. It skips if
// no snapshot inode takes its source inode's address.
func TestBtrfsDevOfStaleMarkSnapshot(t *testing.T) {
	fs := loopfs.Make(t, "btrfs", 256)
	s1, s2 := filepath.Join(fs.Mount, "s1"), filepath.Join(fs.Mount, "s2")
	if out, err := exec.Command("btrfs", "subvolume", "create", s1).CombinedOutput(); err != nil {
		t.Fatalf("btrfs subvolume create: %v: %s", err, out)
	}
	const nfiles = 16
	buf := make([]byte, 4096)
	for i := range nfiles {
		if err := os.WriteFile(filepath.Join(s1, fmt.Sprint("f", i)), buf, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if out, err := exec.Command("btrfs", "subvolume", "snapshot", s1, s2).CombinedOutput(); err != nil {
		t.Fatalf("btrfs subvolume snapshot: %v: %s", err, out)
	}
	// No inode of the files in memory: each is allocated when opened.
	fs.Cool(t)
	var sv1, sv2 syscall.Stat_t
	syscall.Stat(s1, &sv1)
	syscall.Stat(s2, &sv2)
	d1, d2 := KernelDev(sv1.Dev), KernelDev(sv2.Dev)
	sb, err := BtrfsSuperblock(fs.Mount)
	if err != nil {
		t.Fatal(err)
	}
	c, err := Open(Options{Devices: []uint64{sv1.Dev, sv2.Dev}, Btrfs: []uint64{sb}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rc := newRecorder(c)
	rc.drain()

	// One thread on one CPU: the task's mark, and the slab's per-CPU
	// freelist.
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var set, one unix.CPUSet
	if err := unix.SchedGetaffinity(0, &set); err != nil {
		t.Fatal(err)
	}
	cpu := 0
	for ; cpu < 1024 && !set.IsSet(cpu); cpu++ {
	}
	one.Set(cpu)
	if err := unix.SchedSetaffinity(0, &one); err != nil {
		t.Fatal(err)
	}
	defer unix.SchedSetaffinity(0, &set)
	pidfd, err := unix.PidfdOpen(unix.Gettid(), unix.O_EXCL) // PIDFD_THREAD
	if err != nil {
		t.Skipf("pidfd_open(PIDFD_THREAD): %v", err)
	}
	defer unix.Close(pidfd)
	var held []*os.File
	defer func() {
		for _, f := range held {
			f.Close()
		}
	}()
	data := []byte("the snapshot's own change, 32 B.")
	for i := range nfiles {
		name := fmt.Sprint("f", i)
		f1, err := os.OpenFile(filepath.Join(s1, name), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		var st syscall.Stat_t
		syscall.Fstat(int(f1.Fd()), &st)
		ino, gen := st.Ino, inodeGen(t, f1)
		f1.Close()
		// From here to the snapshot file's write: raw syscalls only, no
		// write of any kind (the Go runtime's wake-ups write to an
		// eventfd, whose exit would clear the mark).
		fd1, err := unix.Open(filepath.Join(s1, name), unix.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := unix.Pwrite(fd1, buf, 0); err != nil {
			t.Fatal(err)
		}
		// The mark the write left, had its exit program been skipped:
		// still live.
		var m CaptureTaskWrite
		if err := c.objs.TaskWrites.Lookup(int32(pidfd), &m); err != nil {
			t.Fatalf("the task's mark: %v", err)
		}
		if m.Dev != d1 || m.Ino != ino || m.Gen != gen {
			t.Fatalf("the task's mark %+v does not name s1/%s (dev %#x ino %d gen %d)", m, name, d1, ino, gen)
		}
		m.Ts = 1
		if err := c.objs.TaskWrites.Update(int32(pidfd), &m, ebpf.UpdateExist); err != nil {
			t.Fatal(err)
		}
		unix.Close(fd1)
		// The source's inode goes (unlinked and closed: evicted, freed
		// after a grace period, on this CPU).
		if err := unix.Unlink(filepath.Join(s1, name)); err != nil {
			t.Fatal(err)
		}
		unix.Syscall(unix.SYS_MEMBARRIER, 1 /* MEMBARRIER_CMD_GLOBAL: synchronize_rcu */, 0, 0)
		unix.Nanosleep(&unix.Timespec{Nsec: 50e6}, nil)
		fd2, err := unix.Open(filepath.Join(s2, name), unix.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		f2 := os.NewFile(uintptr(fd2), name)
		held = append(held, f2)
		var before CaptureTaskWrite
		c.objs.TaskWrites.Lookup(int32(pidfd), &before)
		if _, err := unix.Pwrite(fd2, data, 1024); err != nil {
			t.Fatal(err)
		}
		recs := rc.drain()
		var st2 unix.Stat_t
		if err := unix.Fstat(fd2, &st2); err != nil || st2.Ino != ino || inodeGen(t, f2) != gen {
			t.Fatalf("s2/%s: ino %d gen %d, the source's %d %d: a snapshot keeps both", name, st2.Ino, inodeGen(t, f2), ino, gen)
		}
		var now CaptureTaskWrite
		if err := c.objs.TaskWrites.Lookup(int32(pidfd), &now); err != nil {
			t.Fatal(err)
		}
		if before.Ts == 0 {
			t.Fatalf("the mark was cleared before the snapshot file's write: %+v", before)
		}
		if now.Inode != m.Inode {
			t.Logf("s2/%s's inode is not where s1/%s's was: next", name, name)
			continue
		}
		t.Logf("s2/%s's inode took s1/%s's address %#x", name, name, m.Inode)
		var own []Record
		for _, r := range recs {
			if r.Ino == ino && r.Dev == d2 && r.Kind == KindData {
				own = append(own, r)
			}
		}
		if !coveredBy(own, 1024, 1024+uint64(len(data))) {
			t.Fatalf("s2/%s's write [1024, %d) has no record with its subvolume's device %#x (the source's is %#x); records: %+v",
				name, 1024+len(data), d2, d1, recs)
		}
		return
	}
	t.Skip("no snapshot inode took its source inode's address")
}
