package barrier

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"sync/atomic"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

const copyPayload = "record 1: committed\n"

// aioWriteThenFdsync submits, in one io_submit, a buffered write of
// copyPayload at offset 0 and an IOCB_CMD_FDSYNC of the same file, then
// reaps both completions. The kernel runs a buffered AIO write inline in
// io_submit, before it queues the flush that follows it: on ext4 or XFS
// the fdsync's success means the write is on disk.
func aioWriteThenFdsync(file string) int {
	f, err := os.OpenFile(file, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		return 130
	}
	var ctx uint64
	if _, _, e := unix.Syscall(unix.SYS_IO_SETUP, 2, uintptr(unsafe.Pointer(&ctx)), 0); e != 0 {
		return 131
	}
	data := []byte(copyPayload)
	cbs := []aioIocb{
		{Opcode: iocbCmdPwrite, Fd: uint32(f.Fd()), Buf: uint64(uintptr(unsafe.Pointer(&data[0]))), Nbytes: uint64(len(data))},
		{Opcode: iocbCmdFdsync, Fd: uint32(f.Fd())},
	}
	ptrs := []uintptr{uintptr(unsafe.Pointer(&cbs[0])), uintptr(unsafe.Pointer(&cbs[1]))}
	if n, _, e := unix.Syscall(unix.SYS_IO_SUBMIT, uintptr(ctx), 2, uintptr(unsafe.Pointer(&ptrs[0]))); e != 0 || n != 2 {
		fmt.Fprintln(os.Stderr, "io_submit:", n, e)
		return 134
	}
	var ev [2][4]int64
	got := 0
	for got < 2 {
		n, _, e := unix.Syscall6(unix.SYS_IO_GETEVENTS, uintptr(ctx), 1, uintptr(2-got), uintptr(unsafe.Pointer(&ev[got])), 0, 0)
		if e == unix.EINTR {
			continue
		}
		if e != 0 {
			return 135
		}
		got += int(n)
	}
	runtime.KeepAlive(cbs)
	runtime.KeepAlive(data)
	for _, e := range ev {
		if e[2] < 0 {
			fmt.Fprintln(os.Stderr, "aio request failed:", e[2])
			return 136
		}
	}
	return 0
}

// dsyncByKernelCopy opens file with O_DSYNC (duet places it at a
// descriptor ≥ SyncFDBase) and fills it with sendfile, copy_file_range or
// splice instead of write: on an O_DSYNC file the kernel makes each of
// them synchronous (iter_file_splice_write → generic_write_sync), so a
// successful return tells the program the bytes are durable.
func dsyncByKernelCopy(mode, file string) int {
	src, err := os.CreateTemp(filepath.Dir(file), "src")
	if err != nil {
		return 140
	}
	if _, err := src.WriteString(copyPayload); err != nil {
		return 141
	}
	dst, err := os.OpenFile(file, os.O_WRONLY|os.O_CREATE|unix.O_DSYNC, 0o644)
	if err != nil {
		return 142
	}
	if dst.Fd() < SyncFDBase {
		return 143
	}
	n := len(copyPayload)
	var got int
	switch mode {
	case "dsync-sendfile":
		off := int64(0)
		got, err = unix.Sendfile(int(dst.Fd()), int(src.Fd()), &off, n)
		if err == nil && off != int64(got) {
			fmt.Fprintln(os.Stderr, "sendfile moved the offset to", off, "want", got)
			return 147
		}
	case "dsync-copy-file-range":
		off := int64(0)
		got, err = unix.CopyFileRange(int(src.Fd()), &off, int(dst.Fd()), nil, n, 0)
		if err == nil && off != int64(got) {
			fmt.Fprintln(os.Stderr, "copy_file_range moved the offset to", off, "want", got)
			return 147
		}
	case "dsync-splice":
		var p [2]int
		if err := unix.Pipe(p[:]); err != nil {
			return 144
		}
		if _, err := unix.Write(p[1], []byte(copyPayload)); err != nil {
			return 145
		}
		var g int64
		g, err = unix.Splice(p[0], nil, int(dst.Fd()), nil, n, 0)
		got = int(g)
	}
	if err != nil || got != n {
		fmt.Fprintln(os.Stderr, mode, got, err)
		return 146
	}
	// The destination's own offset moved (copy_file_range, splice: no
	// pointer; sendfile always): the copy was made on its open file.
	if pos, err := unix.Seek(int(dst.Fd()), 0, io.SeekCurrent); err != nil || pos != int64(n) {
		fmt.Fprintln(os.Stderr, mode, "left the destination's offset at", pos, err)
		return 148
	}
	return 0
}

// TestAIOFlushCoversWriteSubmittedWithIt: a program submits a write and an
// fdsync of the same file in one io_submit and reaps both. The kernel has
// done the (buffered) write before it queues the flush, so the flush's
// completion tells the program the write is durable. The barrier runs
// before the call continues: it must find the write in the file already
// (the supervisor writes it ahead), or it covers nothing of it.
func TestAIOFlushCoversWriteSubmittedWithIt(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "f")
	t.Setenv("DUET_BARRIER_HELPER", "aio-write-fdsync")
	t.Setenv("DUET_BARRIER_FILE", file)
	var n atomic.Int32
	var seen atomic.Value
	seen.Store("")
	wait := func(int32) error {
		n.Add(1)
		b, _ := os.ReadFile(file)
		seen.Store(string(b))
		return nil
	}
	if code := supervise(t, wait, self); code != 0 {
		t.Fatalf("helper exit %d", code)
	}
	if got, _ := os.ReadFile(file); string(got) != copyPayload {
		t.Fatalf("file holds %q after the helper", got)
	}
	if n.Load() == 0 {
		t.Fatal("the fdsync was not held at all")
	}
	if s := seen.Load().(string); s != copyPayload {
		t.Errorf("the barrier ran with the file holding %q, want %q: the fdsync completed, "+
			"the program counts the write durable, and the barrier covered nothing of it", s, copyPayload)
	}
}

// TestKernelCopiesToSyncFileWait: sendfile, copy_file_range and splice
// into a file opened with O_DSYNC are synchronous writes (the kernel
// flushes before they return), like write(2) on it. They were let
// through: the program was told its bytes were durable with no barrier
// run. The supervisor now makes the copy and holds it.
func TestKernelCopiesToSyncFileWait(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, mode := range []string{"dsync-sendfile", "dsync-copy-file-range", "dsync-splice"} {
		file := filepath.Join(t.TempDir(), "f")
		t.Setenv("DUET_BARRIER_HELPER", mode)
		t.Setenv("DUET_BARRIER_FILE", file)
		var n atomic.Int32
		if code := supervise(t, counting(&n, nil), self); code != 0 {
			t.Errorf("%s: helper exit %d", mode, code)
			continue
		}
		if got, _ := os.ReadFile(file); string(got) != copyPayload {
			t.Errorf("%s: file holds %q", mode, got)
		}
		if n.Load() == 0 {
			t.Errorf("%s into an O_DSYNC file returned with no barrier run", mode)
		}
	}
}

// TestFilterHoldsOpenByHandleSync: open_by_handle_at (the open of
// userspace file servers, with CAP_DAC_READ_SEARCH) takes O_SYNC/O_DSYNC
// in its third argument like openat; the filter let it run, the file
// landed below SyncFDBase, and its synchronous writes were never held.
func TestFilterHoldsOpenByHandleSync(t *testing.T) {
	got := run(filter(), unix.SYS_OPEN_BY_HANDLE_AT, 3, 0, unix.O_WRONLY|unix.O_DSYNC)
	if got != unix.SECCOMP_RET_USER_NOTIF {
		t.Errorf("open_by_handle_at with O_DSYNC: %#x, want the supervisor (%#x)", got, unix.SECCOMP_RET_USER_NOTIF)
	}
}

// dsyncByHandle opens file by its handle with O_DSYNC, as a userspace
// file server does, and writes copyPayload through it: duet must place it
// at SyncFDBase or above, where its writes are held.
func dsyncByHandle(file string) int {
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		return 150
	}
	h, _, err := unix.NameToHandleAt(unix.AT_FDCWD, file, 0)
	if err != nil {
		return 151
	}
	mount, err := unix.Open(filepath.Dir(file), unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		return 152
	}
	fd, err := unix.OpenByHandleAt(mount, h, unix.O_WRONLY|unix.O_DSYNC)
	if err == unix.EPERM {
		return 77 // no CAP_DAC_READ_SEARCH
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "open_by_handle_at:", err)
		return 153
	}
	if fd < SyncFDBase {
		fmt.Fprintln(os.Stderr, "open_by_handle_at with O_DSYNC gave descriptor", fd)
		return 154
	}
	if _, err := unix.Write(fd, []byte(copyPayload)); err != nil {
		return 155
	}
	return 0
}

// TestOpenByHandleSyncHeld: a file opened by handle with O_DSYNC is placed
// where its writes are held, and a write through it waits for the barrier.
func TestOpenByHandleSyncHeld(t *testing.T) {
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(t.TempDir(), "f")
	t.Setenv("DUET_BARRIER_HELPER", "dsync-by-handle")
	t.Setenv("DUET_BARRIER_FILE", file)
	var n atomic.Int32
	switch code := supervise(t, counting(&n, nil), self); code {
	case 0:
	case 77:
		t.Skip("open_by_handle_at needs CAP_DAC_READ_SEARCH")
	default:
		t.Fatalf("helper exit %d", code)
	}
	if got, _ := os.ReadFile(file); string(got) != copyPayload {
		t.Errorf("file holds %q", got)
	}
	if n.Load() == 0 {
		t.Error("a write through a file opened by handle with O_DSYNC returned with no barrier run")
	}
}
