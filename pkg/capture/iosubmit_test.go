package capture

import (
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/duet-ha/duet/pkg/loopfs"
	"golang.org/x/sys/unix"
)

// iocb is Linux's struct iocb (x86-64) for io_submit.
type iocb struct {
	data         uint64
	key, rwFlags uint32
	opcode       uint16
	prio         int16
	fd           uint32
	buf, n       uint64
	off          int64
	res2         uint64
	flags, resfd uint32
}

// aioContext is a Linux AIO context for the test (io_setup), destroyed
// at its end.
func aioContext(t *testing.T) uintptr {
	t.Helper()
	var ctx uintptr
	if _, _, e := unix.Syscall(unix.SYS_IO_SETUP, 8, uintptr(unsafe.Pointer(&ctx)), 0); e != 0 {
		t.Skipf("io_setup: %v", e)
	}
	t.Cleanup(func() { unix.Syscall(unix.SYS_IO_DESTROY, ctx, 0, 0) })
	return ctx
}

// btrfsFile is a new file on a captured btrfs filesystem, and its inode.
func btrfsFile(t *testing.T) (*Capture, *os.File, uint64) {
	fs := loopfs.Make(t, "btrfs", 256)
	c := openOn(t, "btrfs", fs.Mount)
	f, err := os.Create(filepath.Join(fs.Mount, "f"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	var st syscall.Stat_t
	if err := syscall.Fstat(int(f.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	return c, f, st.Ino
}

// Two io_uring writes linked (IOSQE_IO_LINK), submitted without
// GETEVENTS: the second is issued from task_work on the return to user
// mode, after sys_exit_io_uring_enter ran, by the submitting task itself
// (orig_ax still io_uring_enter, a syscall whose exit is hooked). Both must
// be reported. A capture that gathered a write's folios until its
// syscall's exit (e2020ea) never reported the second: the thread exits and
// its task storage goes with it.
func TestLinkedUringWriteAfterExitReported(t *testing.T) {
	c, f, ino := btrfsFile(t)
	// Preallocated: btrfs takes a NOWAIT buffered write only into
	// NOCOW or preallocated ranges (else -EAGAIN, and io-wq runs it).
	if err := unix.Fallocate(int(f.Fd()), 0, 0, 4<<20); err != nil {
		t.Fatal(err)
	}
	rc := newRecorder(c)
	rc.drain()
	forgetFile(t, c, ino, 2<<20)
	before, _ := c.Counters()
	r := newRing(t)
	buf := make([]byte, 4096)
	for i := range buf {
		buf[i] = 'x'
	}
	seen := make(chan uint64, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with the goroutine
		head := atomic.LoadUint32(r.cqHead)
		addr := uint64(uintptr(unsafe.Pointer(&buf[0])))
		r.put(ioringOpWrite, 1<<2, int(f.Fd()), 0, addr, 4096)  // IOSQE_IO_LINK
		r.put(ioringOpWrite, 0, int(f.Fd()), 1<<20, addr, 4096) // linked: runs when the first completes
		_, _, errno := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), 2, 0, 0, 0, 0)
		runtime.KeepAlive(buf)
		if errno != 0 {
			t.Errorf("io_uring_enter: %v", errno)
			seen <- 0
			return
		}
		for start := time.Now(); atomic.LoadUint32(r.cqTail)-head < 2; {
			if time.Since(start) > 5*time.Second {
				t.Errorf("the two writes did not complete within 5 s")
				seen <- 0
				return
			}
		}
		for i := uint32(0); i < 2; i++ {
			cqe := r.cqesOffset + ((head+i)&r.cqMask)*16
			if res := *(*int32)(unsafe.Pointer(&r.rings[cqe+8])); res != 4096 {
				t.Errorf("cqe %d: %d", i, res)
			}
		}
		atomic.StoreUint32(r.cqHead, head+2)
		seen <- 0
	}()
	<-seen
	time.Sleep(100 * time.Millisecond) // the thread is gone by now
	var recs []Record
	for _, rec := range rc.drain() {
		if rec.Seq > before.Seq {
			t.Logf("%+v", rec)
			recs = append(recs, rec)
		}
	}
	if !covers(recs, ino, KindData, 0, 4096) {
		t.Errorf("the first write [0, 4096) has no record")
	}
	if !covers(recs, ino, KindData, 1<<20, 1<<20+4096) {
		t.Errorf("the linked write [1 MiB, +4096), completed and acknowledged, has no record")
	}
}

// io_submit with a buffered btrfs write and then a long read: the write's
// completion event is in the aio ring, and another thread's io_getevents
// returns it, while io_submit still runs the read. A durability call made
// then must find the write's record (a capture that reported it at
// io_submit's exit, e2020ea, emitted it 60 to 400 ms later).
func TestAioWriteReportedBeforeItsCompletion(t *testing.T) {
	c, f, ino := btrfsFile(t)
	zero, err := os.Open("/dev/zero")
	if err != nil {
		t.Fatal(err)
	}
	defer zero.Close()
	ctx := aioContext(t)
	wbuf := make([]byte, 4096)
	rbuf := make([]byte, 512<<20)
	cbs := []iocb{
		{opcode: 1, fd: uint32(f.Fd()), buf: uint64(uintptr(unsafe.Pointer(&wbuf[0]))), n: 4096},
		{opcode: 0, fd: uint32(zero.Fd()), buf: uint64(uintptr(unsafe.Pointer(&rbuf[0]))), n: uint64(len(rbuf)), data: 1},
	}
	ptrs := []uintptr{uintptr(unsafe.Pointer(&cbs[0])), uintptr(unsafe.Pointer(&cbs[1]))}
	before, _ := c.Counters()
	got := make(chan uint64, 1)
	go func() {
		var ev [2][4]int64
		var e syscall.Errno
		// EINTR (the Go runtime's preemption signal) reaps nothing: the
		// view below must be taken after an event was reaped, so call
		// again.
		for e = unix.EINTR; e == unix.EINTR; {
			_, _, e = unix.Syscall6(unix.SYS_IO_GETEVENTS, ctx, 1, 1, uintptr(unsafe.Pointer(&ev[0])), 0, 0)
		}
		// The durability call's view: the records emitted so far.
		cn, _ := c.Counters()
		if e != 0 || ev[0][0] != 0 {
			t.Errorf("io_getevents: %v, first event %v", e, ev[0])
		}
		got <- cn.Seq
	}()
	time.Sleep(50 * time.Millisecond)
	start := time.Now()
	n, _, e := unix.Syscall(unix.SYS_IO_SUBMIT, ctx, 2, uintptr(unsafe.Pointer(&ptrs[0])))
	took := time.Since(start)
	runtime.KeepAlive(cbs)
	runtime.KeepAlive(wbuf)
	runtime.KeepAlive(rbuf)
	if e != 0 || n != 2 {
		t.Fatalf("io_submit: %d %v", n, e)
	}
	seqAtEvent := <-got
	t.Logf("io_submit took %v; seq before %d, at the event %d", took, before.Seq, seqAtEvent)
	for _, rec := range collect(t, c) {
		if rec.Ino == ino && rec.Kind == KindData && rec.Pos == 0 {
			t.Logf("%+v", rec)
			if rec.Seq > seqAtEvent {
				t.Errorf("the write's record (seq %d) was emitted after its completion was reaped (%d records then): a durability call then misses it", rec.Seq, seqAtEvent)
			}
			return
		}
	}
	t.Errorf("no record of the write")
}

// One io_submit writes a btrfs file, then an ext4 file, both watched: each
// write is reported with its own device (a capture that gathered the btrfs
// write until the exit, e2020ea, reported it with the ext4 device, which
// the ext4 write's mark had written over).
func TestBtrfsAndExt4WritesInOneSubmit(t *testing.T) {
	bfs := loopfs.Make(t, "btrfs", 256)
	efs := loopfs.Make(t, "ext4", 64)
	var bst, est syscall.Stat_t
	syscall.Stat(bfs.Mount, &bst)
	syscall.Stat(efs.Mount, &est)
	sb, err := BtrfsSuperblock(bfs.Mount)
	if err != nil {
		t.Fatal(err)
	}
	c, err := Open(Options{Devices: []uint64{bst.Dev, est.Dev}, Btrfs: []uint64{sb}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rc := newRecorder(c)
	bf, _ := os.Create(filepath.Join(bfs.Mount, "f"))
	ef, _ := os.Create(filepath.Join(efs.Mount, "g"))
	defer bf.Close()
	defer ef.Close()
	var fst syscall.Stat_t
	syscall.Fstat(int(bf.Fd()), &fst)
	rc.drain()
	ctx := aioContext(t)
	buf := make([]byte, 4096)
	cbs := []iocb{
		{opcode: 1, fd: uint32(bf.Fd()), buf: uint64(uintptr(unsafe.Pointer(&buf[0]))), n: 4096},
		{opcode: 1, fd: uint32(ef.Fd()), buf: uint64(uintptr(unsafe.Pointer(&buf[0]))), n: 4096},
	}
	ptrs := []uintptr{uintptr(unsafe.Pointer(&cbs[0])), uintptr(unsafe.Pointer(&cbs[1]))}
	n, _, e := unix.Syscall(unix.SYS_IO_SUBMIT, ctx, 2, uintptr(unsafe.Pointer(&ptrs[0])))
	runtime.KeepAlive(cbs)
	runtime.KeepAlive(buf)
	if e != 0 || n != 2 {
		t.Fatalf("io_submit: %d %v", n, e)
	}
	ok := false
	for _, rec := range rc.drain() {
		t.Logf("%+v", rec)
		if rec.Ino == fst.Ino && rec.Kind == KindData && rec.Dev == KernelDev(fst.Dev) && rec.Pos == 0 {
			ok = true
		}
	}
	t.Logf("btrfs dev %d ino %d, ext4 dev %d", KernelDev(fst.Dev), fst.Ino, KernelDev(est.Dev))
	if !ok {
		t.Errorf("the btrfs write has no data record with its own device")
	}
}

// Two btrfs subvolumes, both watched, each with a file of the same inode
// number (a subvolume numbers its own inodes), written by one io_submit:
// one syscall, one task, two inodes. Each write's records must carry its
// own subvolume's device. The device of a btrfs write's later folios is
// taken from the task's mark (btrfs_dev_of) when the mark names the same
// inode; a mark matched on the inode number alone gave the second file
// the first one's device, and its write was reported for the other
// subvolume's file.
func TestBtrfsSubvolumesSameInodeOneSubmit(t *testing.T) {
	fs := loopfs.Make(t, "btrfs", 256)
	var devs [2]uint64
	var files [2]*os.File
	for i, name := range []string{"s1", "s2"} {
		dir := filepath.Join(fs.Mount, name)
		if out, err := exec.Command("btrfs", "subvolume", "create", dir).CombinedOutput(); err != nil {
			t.Fatalf("btrfs subvolume create: %v: %s", err, out)
		}
		f, err := os.Create(filepath.Join(dir, "f"))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		files[i] = f
		var st syscall.Stat_t
		syscall.Fstat(int(f.Fd()), &st)
		devs[i] = st.Dev
	}
	sb, err := BtrfsSuperblock(fs.Mount)
	if err != nil {
		t.Fatal(err)
	}
	c, err := Open(Options{Devices: devs[:], Btrfs: []uint64{sb}})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	var ino [2]uint64
	for i, f := range files {
		var st syscall.Stat_t
		syscall.Fstat(int(f.Fd()), &st)
		ino[i] = st.Ino
	}
	if ino[0] != ino[1] {
		t.Fatalf("the two files have inode numbers %d and %d: the test needs them equal", ino[0], ino[1])
	}
	rc := newRecorder(c)
	rc.drain()
	ctx := aioContext(t)
	const n = 64 << 10 // 16 folios each
	buf := make([]byte, n)
	for round, order := range [][2]int{{0, 1}, {1, 0}} {
		off := int64(round) * n
		var cbs [2]iocb
		for k, i := range order {
			cbs[k] = iocb{opcode: 1, fd: uint32(files[i].Fd()), buf: uint64(uintptr(unsafe.Pointer(&buf[0]))), n: n, off: off}
		}
		ptrs := []uintptr{uintptr(unsafe.Pointer(&cbs[0])), uintptr(unsafe.Pointer(&cbs[1]))}
		got, _, e := unix.Syscall(unix.SYS_IO_SUBMIT, ctx, 2, uintptr(unsafe.Pointer(&ptrs[0])))
		runtime.KeepAlive(cbs)
		runtime.KeepAlive(buf)
		if e != 0 || got != 2 {
			t.Fatalf("io_submit: %d %v", got, e)
		}
		recs := rc.drain()
		for i := range files {
			dev := KernelDev(devs[i])
			var held []Record
			for _, r := range recs {
				if r.Dev == dev && r.Ino == ino[i] && r.Kind == KindData {
					held = append(held, r)
				}
			}
			if !coveredBy(held, uint64(off), uint64(off+n)) {
				t.Errorf("round %d: s%d/f's write [%d, %d) is not covered by its subvolume's records %+v (all: %+v)",
					round, i+1, off, off+n, held, recs)
			}
		}
	}
}

// coveredBy says whether recs together cover [off, end).
func coveredBy(recs []Record, off, end uint64) bool {
	for off < end {
		next := off
		for _, r := range recs {
			if r.Pos <= off && r.Pos+r.Len > next {
				next = r.Pos + r.Len
			}
		}
		if next == off {
			return false
		}
		off = next
	}
	return true
}
