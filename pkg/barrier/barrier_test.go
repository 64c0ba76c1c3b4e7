package barrier

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// The test binary doubles as the supervised child when re-executed.
func TestMain(m *testing.M) {
	if len(os.Args) > 1 && os.Args[1] == ChildCommand {
		args := os.Args[2:]
		if len(args) > 0 && args[0] == "--" {
			args = args[1:]
		}
		fmt.Fprintln(os.Stderr, RunChild(args))
		os.Exit(127)
	}
	os.Exit(m.Run())
}

func supervise(t *testing.T, wait Func, args ...string) int {
	t.Helper()
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	code, err := Exec(context.Background(), self, args, wait)
	if err != nil {
		t.Fatalf("Exec %v: %v", args, err)
	}
	return code
}

func counting(n *atomic.Int32, err error) Func {
	return func(int32) error {
		n.Add(1)
		return err
	}
}

func TestExitStatusPassesThrough(t *testing.T) {
	var n atomic.Int32
	if code := supervise(t, counting(&n, nil), "sh", "-c", "exit 3"); code != 3 {
		t.Fatalf("exit status %d, want 3", code)
	}
	if code := supervise(t, counting(&n, nil), "sh", "-c", "kill -TERM $$"); code != 128+int(unix.SIGTERM) {
		t.Fatalf("killed by SIGTERM: status %d, want %d", code, 128+int(unix.SIGTERM))
	}
}

// A grandchild's fsync is held too: the filter is inherited.
func TestChildrenAreSupervised(t *testing.T) {
	var n atomic.Int32
	f := filepath.Join(t.TempDir(), "f")
	code := supervise(t, counting(&n, nil), "sh", "-c", "dd if=/dev/zero of="+f+" bs=1 count=1 conv=fsync 2>/dev/null; sync")
	if code != 0 {
		t.Fatalf("exit %d", code)
	}
	if n.Load() < 2 {
		t.Fatalf("%d durability calls seen, want the fsync of dd and the sync", n.Load())
	}
}

// When the barrier cannot confirm, the call fails with EIO.
func TestUnconfirmedFsyncFails(t *testing.T) {
	var n atomic.Int32
	f := filepath.Join(t.TempDir(), "f")
	code := supervise(t, counting(&n, errors.New("peer unreachable")), "dd", "if=/dev/zero", "of="+f, "bs=1", "count=1", "conv=fsync")
	if code == 0 || n.Load() == 0 {
		t.Fatalf("dd exit %d after %d refused fsyncs: the failure did not reach the program", code, n.Load())
	}
}

func TestFilterShape(t *testing.T) {
	f := filter()
	// The trapped calls must jump to the USER_NOTIF return.
	for i := range trapped {
		ins := f[4+i]
		if target := 4 + i + 1 + int(ins.Jt); f[target].K != unix.SECCOMP_RET_USER_NOTIF {
			t.Fatalf("syscall %d jumps to %#x", trapped[i], f[target].K)
		}
	}
	if f[len(f)-1].K != unix.SECCOMP_RET_ERRNO|uint32(unix.ENOSYS) {
		t.Fatal("io_uring_setup does not fail with ENOSYS")
	}
}
