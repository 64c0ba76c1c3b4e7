package aiosync

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/duet-ha/duet/pkg/internal/threads"
	"github.com/duet-ha/duet/pkg/loopfs"
	"golang.org/x/sys/unix"
)

// A flush Sync queues runs on a kernel worker: while it runs, none of
// this process's threads is in fsync or fdatasync on the file (the
// goroutine that asked waits on a channel and holds no P). Both kinds,
// on a file with 128 MiB to write back, long enough to be seen.
func TestSyncHoldsNoThread(t *testing.T) {
	if err := Available(); err != nil {
		t.Skipf("no AIO here: %v", err)
	}
	fs := loopfs.Make(t, "ext4", 512)
	buf := make([]byte, 1<<20)
	for i := range buf {
		buf[i] = byte(i * 7)
	}
	for _, datasync := range []bool{true, false} {
		f, err := os.Create(filepath.Join(fs.Mount, "f"+strconv.FormatBool(datasync)))
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		for range 128 {
			if _, err := f.Write(buf); err != nil {
				t.Fatal(err)
			}
		}
		fd := int(f.Fd())
		done := make(chan error, 1)
		start := time.Now()
		go func() { done <- Sync(fd, datasync) }()
		looks, seen := 0, []string(nil)
	wait:
		for {
			select {
			case err := <-done:
				if err != nil {
					t.Fatalf("Sync(datasync %v): %v", datasync, err)
				}
				break wait
			default:
			}
			tids, err := threads.InSyscallOn(fd, unix.SYS_FSYNC, unix.SYS_FDATASYNC)
			if err != nil {
				t.Fatal(err)
			}
			if len(tids) > 0 {
				seen = tids
			}
			looks++
			time.Sleep(time.Millisecond)
		}
		took := time.Since(start)
		if seen != nil {
			t.Errorf("datasync %v: threads %v of this process were in the flush", datasync, seen)
		}
		t.Logf("datasync %v: the flush took %v, looked %d times", datasync, took, looks)
		if looks < 3 {
			// 128 MiB to write back through a loop device takes
			// over 100 ms here: a Sync this quick did not wait.
			t.Errorf("datasync %v: Sync returned %v after it began, with 128 MiB to write back", datasync, took)
		}
		// Nothing is left to write back: the file was flushed.
		if err := unix.Fdatasync(fd); err != nil {
			t.Fatal(err)
		}
	}
}

// What cannot be queued is flushed by the caller, with the same result:
// a pipe has no fsync (EINVAL), a closed descriptor is EBADF.
func TestSyncErrors(t *testing.T) {
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	for _, datasync := range []bool{true, false} {
		if err := Sync(int(w.Fd()), datasync); !errors.Is(err, unix.EINVAL) {
			t.Errorf("Sync of a pipe (datasync %v): %v; want EINVAL", datasync, err)
		}
	}
	fd, err := unix.Open(t.TempDir(), unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	unix.Close(fd)
	if err := Sync(fd, true); !errors.Is(err, unix.EBADF) {
		t.Errorf("Sync of a closed descriptor: %v; want EBADF", err)
	}
}

// Many flushes at once, more than the context holds, each get their own
// result: a directory's (nil) or a pipe's (EINVAL), never another's.
func TestSyncConcurrent(t *testing.T) {
	dir, err := os.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer dir.Close()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	syncHalves(t, "a directory", int(dir.Fd()), nil, "a pipe", int(w.Fd()), unix.EINVAL)
}

// syncHalves runs twice the context's depth of Syncs at once, half on
// fdA, half on fdB, each with a mix of datasync and not, and checks
// that each gets its own file's result: wantA or wantB (nil: success).
func syncHalves(t *testing.T, nameA string, fdA int, wantA error, nameB string, fdB int, wantB error) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan string, 2*depth)
	for i := range 2 * depth {
		wg.Add(1)
		go func() {
			defer wg.Done()
			name, fd, want := nameA, fdA, wantA
			if i%2 == 1 {
				name, fd, want = nameB, fdB, wantB
			}
			err := Sync(fd, i%4 < 2)
			if (want == nil && err != nil) || (want != nil && !errors.Is(err, want)) {
				errs <- fmt.Sprintf("%s: %v; want %v", name, err, want)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
}

// The results the kernel's worker produces (not io_submit's refusals)
// reach their own callers: on an ext4 shut down (EXT4_IOC_SHUTDOWN) a
// file's flush fails in the worker with EIO, while a healthy directory's
// succeeds; twice the context's depth at once, half of each. (From a
// review: a reaper that dropped the kernel's result, or handed it to
// another caller, passed the other tests.)
func TestSyncWorkerResultsReachTheirCallers(t *testing.T) {
	if err := Available(); err != nil {
		t.Skipf("no AIO here: %v", err)
	}
	fs := loopfs.Make(t, "ext4", 64)
	f, err := os.Create(filepath.Join(fs.Mount, "f"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.Write(make([]byte, 1<<16)); err != nil {
		t.Fatal(err)
	}
	const ext4IocShutdown = 0x8004587d // _IOR('X', 125, __u32)
	flags := uint32(2)                 // EXT4_GOING_FLAGS_NOLOGFLUSH
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), ext4IocShutdown, uintptr(unsafe.Pointer(&flags))); e != 0 {
		t.Fatalf("EXT4_IOC_SHUTDOWN: %v", e)
	}
	good, err := os.Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer good.Close()
	syncHalves(t, "a file on the shut-down ext4", int(f.Fd()), unix.EIO, "a healthy directory", int(good.Fd()), nil)
}
