package node

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/duet-ha/duet/pkg/cluster"
	"github.com/duet-ha/duet/pkg/loopfs"
	"github.com/duet-ha/duet/pkg/replica"
	"github.com/duet-ha/duet/pkg/vip"
	"golang.org/x/sys/unix"
)

// shutDown makes every later I/O on the filesystem under dir fail
// (FS_IOC_SHUTDOWN without a log flush: a disk that died).
func shutDown(t *testing.T, dir string) {
	t.Helper()
	const fsIocShutdown = 0x8004587d // _IOR('X', 125, __u32)
	const noLogFlush = 2             // FSOP_GOING_FLAGS_NOLOGFLUSH
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	flags := uint32(noLogFlush)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), fsIocShutdown, uintptr(unsafe.Pointer(&flags))); errno != 0 {
		t.Skipf("FS_IOC_SHUTDOWN: %v", errno)
	}
}

// TestDiskProbeSeesAFailedFilesystem: the probe passes on a healthy
// filesystem and fails on one shut down (XFS, ext4) or read-only.
func TestDiskProbeSeesAFailedFilesystem(t *testing.T) {
	for _, fs := range []string{"ext4", "xfs"} {
		t.Run(fs, func(t *testing.T) {
			f := loopfs.Make(t, fs, 300)
			if err := diskProbe(f.Mount, 0); err != nil {
				t.Fatalf("healthy %s: %v", fs, err)
			}
			shutDown(t, f.Mount)
			if err := diskProbe(f.Mount, 0); err == nil {
				t.Errorf("a shut-down %s filesystem passes the probe", fs)
			}
		})
	}
	// ext4 with errors=remount-ro (Debian's root filesystem) after an
	// error: the journal aborts and the filesystem turns read-only (on
	// this kernel "emergency_ro": statfs still says read-write).
	t.Run("ext4-error", func(t *testing.T) {
		f := loopfs.Make(t, "ext4", 64)
		if out, err := exec.Command("mount", "-o", "remount,errors=remount-ro", f.Mount).CombinedOutput(); err != nil {
			t.Fatalf("remount errors=remount-ro: %v %s", err, out)
		}
		trigger := "/sys/fs/ext4/" + filepath.Base(f.Dev) + "/trigger_fs_error"
		if err := os.WriteFile(trigger, []byte("test\n"), 0); err != nil {
			t.Skipf("no ext4 error trigger: %v", err)
		}
		if err := diskProbe(f.Mount, 0); err == nil {
			t.Errorf("an ext4 filesystem after an error (journal aborted) passes the probe")
		}
	})
	t.Run("read-only", func(t *testing.T) {
		f := loopfs.Make(t, "ext4", 64)
		if out, err := exec.Command("mount", "-o", "remount,ro", f.Mount).CombinedOutput(); err != nil {
			t.Fatalf("remount ro: %v %s", err, out)
		}
		if err := diskProbe(f.Mount, 0); err == nil || !strings.Contains(err.Error(), "read-only") {
			t.Errorf("a read-only filesystem: %v, want an error saying read-only", err)
		}
	})
}

// TestServingNodeReportsFailedDisk: a serving node whose replicated
// directory's disk dies tells the cluster loop (EvDiskFailed), which gives
// the role to a peer in sync. It had gone on serving from the dead disk,
// holding the VIP, unless a service noticed.
func TestServingNodeReportsFailedDisk(t *testing.T) {
	f := loopfs.Make(t, "xfs", 300)
	other := t.TempDir() // another filesystem
	state := t.TempDir()
	n := testNode(t, state)
	n.dirs = []replica.Dir{{Name: "data", Path: f.Mount}, {Name: "logs", Path: f.Mount}, {Name: "other", Path: other}}
	n.devs = []uint64{devOf(t, f.Mount), devOf(t, f.Mount), devOf(t, other)}
	for _, d := range n.dirs {
		ms, err := replica.OpenMeta(state, d.Name)
		if err != nil {
			t.Fatal(err)
		}
		n.metas = append(n.metas, ms)
	}
	n.events = make(chan cluster.Event, 4)
	defer watching(n, n.probeUnits())()
	select {
	case ev := <-n.events:
		t.Fatalf("a healthy disk reported: %+v", ev)
	case <-time.After(2*diskProbeInterval + 500*time.Millisecond):
	}
	shutDown(t, f.Mount)
	select {
	case ev := <-n.events:
		if ev.Kind != cluster.EvDiskFailed || !strings.Contains(ev.Why, "directory data") {
			t.Errorf("got %+v, want EvDiskFailed naming directory data", ev)
		}
	case <-time.After(3 * diskProbeInterval):
		t.Fatal("the disk under the replicated directory failed and the serving node did not tell its cluster loop")
	}
	// Both directories on the failed filesystem count as crashed (their
	// next resync compares them) and record no handover; the other not.
	for i, d := range n.dirs {
		want := d.Name != "other"
		if got := n.metas[i].Get().Crashed; got != want {
			t.Errorf("directory %s: Crashed %v, want %v", d.Name, got, want)
		}
		if got := n.failedDisk(d.Name); (got != "") != want {
			t.Errorf("directory %s: failedDisk %q, want failed %v", d.Name, got, want)
		}
	}
}

// TestEveryFailedDiskMarked: two replicated directories on two
// filesystems that fail together (two partitions of the dead disk) are
// both marked: a shared report throttle left the second unmarked, and
// leaving the role recorded a handover for it (from a review).
func TestEveryFailedDiskMarked(t *testing.T) {
	f1, f2 := loopfs.Make(t, "xfs", 300), loopfs.Make(t, "xfs", 300)
	state := t.TempDir()
	n := testNode(t, state)
	n.dirs = []replica.Dir{{Name: "a", Path: f1.Mount}, {Name: "b", Path: f2.Mount}}
	n.devs = []uint64{devOf(t, f1.Mount), devOf(t, f2.Mount)}
	n.events = make(chan cluster.Event, 4)
	shutDown(t, f1.Mount)
	shutDown(t, f2.Mount)
	stop := watching(n, n.probeUnits())
	time.Sleep(2*diskProbeInterval + 500*time.Millisecond) // two probes
	stop()
	for _, d := range n.dirs {
		if n.failedDisk(d.Name) == "" {
			t.Errorf("directory %s: its filesystem fails the probe, yet it is not marked failed", d.Name)
		}
	}
}

// TestStateDirDiskFailedFailsAsCrashed: when the filesystem holding the
// state_dir fails, the node can record nothing (neither that it gave the
// role away nor that its copy is stale) and fails as a crashed daemon
// does: it exits. Handing over and staying up, it said "not stale" on
// (its stale mark unsaved), and the new primary's durability calls were
// held for as long as it ran (from a review).
func TestStateDirDiskFailedFailsAsCrashed(t *testing.T) {
	f := loopfs.Make(t, "xfs", 300)
	state := filepath.Join(f.Mount, "state")
	data := filepath.Join(f.Mount, "data")
	for _, d := range []string{state, data} {
		if err := os.Mkdir(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	n := testNode(t, state)
	n.dirs = []replica.Dir{{Name: "data", Path: data}}
	var st unix.Stat_t
	unix.Stat(data, &st)
	n.devs = []uint64{st.Dev}
	n.events = make(chan cluster.Event, 4)
	exited := make(chan int, 4)
	n.exit = func(code int) { exited <- code }
	units := n.probeUnits()
	if len(units) != 1 || !units[0].state {
		t.Fatalf("state_dir and data on one filesystem: units %+v, want one holding the state_dir", units)
	}
	defer watching(n, units)()
	shutDown(t, f.Mount)
	select {
	case code := <-exited:
		if code != 1 {
			t.Errorf("exit status %d, want 1", code)
		}
	case <-time.After(3 * diskProbeInterval):
		t.Fatal("the disk holding state_dir failed and the daemon did not exit")
	}
	select {
	case ev := <-n.events:
		t.Errorf("a handover was asked for (%+v): nothing it does can be recorded", ev)
	default:
	}
}

// TestStateDirFailsWhileNotServing: a node that does not serve (a
// secondary, or a primary that has just handed the role over because a
// service failed on the dead disk first) exits too when its state_dir's
// disk fails. It had stayed up for ever, a secondary that could neither
// apply nor record that its copy is stale, keeping the peer PRIM instead
// of ALONE (TestNemesis, disk-fails-primary: "b is PRIM after 30s, want
// ALONE").
func TestStateDirFailsWhileNotServing(t *testing.T) {
	w := watchingStateDir(t, nil)
	time.Sleep(diskProbeInterval + 200*time.Millisecond)
	select {
	case <-w.exited:
		t.Fatal("exited with the state_dir's disk working")
	default:
	}
	shutDown(t, w.mount)
	select {
	case code := <-w.exited:
		if code != 1 {
			t.Errorf("exit status %d, want 1", code)
		}
	case <-time.After(3 * diskProbeInterval):
		t.Fatal("the disk holding state_dir failed under a node that does not serve, and the daemon did not exit")
	}
}

// TestStateDirProbedAtTermEnd: at a term's end its disk watcher is gone
// at once, but its primaries stay listed until their goroutines end, which
// a Primary stuck in a dead disk's read never does; the state_dir is
// probed meanwhile. A first version skipped while primaries were listed:
// the node, services stopped and VIP removed, said PRIM on and nothing
// probed (from a review).
func TestStateDirProbedAtTermEnd(t *testing.T) {
	w := watchingStateDir(t, func(n *Node) {
		n.primaries = []*replica.Primary{nil} // the ended term's, still listed
	})
	time.Sleep(200 * time.Millisecond) // the watcher started (the disk fails once it probes)
	shutDown(t, w.mount)
	select {
	case <-w.exited:
	case <-time.After(3 * diskProbeInterval):
		t.Fatal("the state_dir's disk failed after the term's disk watcher ended, its primaries still listed: the daemon did not exit")
	}
}

// TestStateDirUnmountedNotRestarted: a state_dir whose filesystem is
// unmounted under the daemon (maintenance after `duet stop`) makes it exit
// with the status its unit does not restart on: restarted, it made an
// empty state_dir on the bare mountpoint and started as a node that never
// served (from a review).
func TestStateDirUnmountedNotRestarted(t *testing.T) {
	w := watchingStateDir(t, nil)
	time.Sleep(200 * time.Millisecond) // the watcher has the state_dir's device
	var err error
	for try := 0; try < 50; try++ { // a probe may hold the directory open
		var out []byte
		if out, err = exec.Command("umount", w.mount).CombinedOutput(); err == nil {
			break
		}
		err = fmt.Errorf("%v: %s", err, out)
		time.Sleep(20 * time.Millisecond)
	}
	if err != nil {
		t.Fatalf("umount: %v", err)
	}
	select {
	case code := <-w.exited:
		if code != exitNotRestarted {
			t.Errorf("exit status %d, want %d (not restarted by the unit)", code, exitNotRestarted)
		}
	case <-time.After(3 * diskProbeInterval):
		t.Fatal("the state_dir's filesystem was unmounted and the daemon did not exit")
	}
	unit, err := os.ReadFile("../../tools/systemd/duet.service")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(unit), fmt.Sprintf("RestartPreventExitStatus=%d", exitNotRestarted)) {
		t.Errorf("tools/systemd/duet.service does not keep the unit from restarting on status %d", exitNotRestarted)
	}
}

// TestStateDirHandedBackAfterTerm: a term's disk watcher probes the
// state_dir while it runs, and hands it back when it ends: a dead
// state_dir after the term is still seen (from a review: no test failed
// without the hand-back).
func TestStateDirHandedBackAfterTerm(t *testing.T) {
	var n *Node
	w := watchingStateDir(t, func(node *Node) { n = node })
	tctx, tcancel := context.WithCancel(context.Background())
	tdone := make(chan struct{})
	go func() { defer close(tdone); n.watchDisks(tctx) }() // a term's watcher
	time.Sleep(300 * time.Millisecond)
	if got := n.stateProbed.Load(); got != 1 {
		t.Fatalf("stateProbed %d while the term's watcher runs, want 1", got)
	}
	tcancel()
	<-tdone
	shutDown(t, w.mount)
	select {
	case <-w.exited:
	case <-time.After(3 * diskProbeInterval):
		t.Fatal("the state_dir's disk failed after the term's watcher ended: not seen")
	}
}

// stateDirWatch is a node whose state_dir is on its own XFS, watched by
// watchStateDir until the test ends.
type stateDirWatch struct {
	mount  string
	exited chan int // the node's exit codes
}

// watchingStateDir starts it, after setup (if not nil) on the node.
func watchingStateDir(t *testing.T, setup func(*Node)) stateDirWatch {
	f := loopfs.Make(t, "xfs", 300)
	state := filepath.Join(f.Mount, "state")
	if err := os.Mkdir(state, 0o700); err != nil {
		t.Fatal(err)
	}
	n := testNode(t, state)
	n.events = make(chan cluster.Event, 4)
	w := stateDirWatch{mount: f.Mount, exited: make(chan int, 64)}
	n.exit = func(code int) { w.exited <- code }
	if setup != nil {
		setup(n)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		n.watchStateDir(ctx)
	}()
	t.Cleanup(func() { cancel(); <-done })
	return w
}

// TestProbeErrorNotADiskFailure: a probe that fails other than as a dead
// disk does (the directory removed) changes nothing: a role handed over
// for it would be a false takeover.
func TestProbeErrorNotADiskFailure(t *testing.T) {
	state := t.TempDir()
	gone := filepath.Join(t.TempDir(), "gone")
	n := testNode(t, state)
	n.dirs = []replica.Dir{{Name: "data", Path: gone}}
	n.events = make(chan cluster.Event, 4)
	stop := watching(n, n.probeUnits())
	time.Sleep(2*diskProbeInterval + 500*time.Millisecond) // two probes
	stop()
	select {
	case ev := <-n.events:
		t.Errorf("a missing directory was taken for a failed disk: %+v", ev)
	default:
	}
	if n.failedDisk("data") != "" {
		t.Errorf("a missing directory was marked as a failed disk")
	}
}

// watching runs n.watchUnits(units) until the returned stop is called.
func watching(n *Node, units []*probeUnit) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		n.watchUnits(ctx, units, nil)
	}()
	return func() { cancel(); <-done }
}

// TestProbeSeesDirectoryOffItsFilesystem: a replicated directory no longer
// on the filesystem it was on at start (unmounted for a repair, duet
// running) fails the probe as a failed disk does: the mountpoint left
// there is empty, and a resync from it would empty the peer's copy (from
// a review).
func TestProbeSeesDirectoryOffItsFilesystem(t *testing.T) {
	f := loopfs.Make(t, "ext4", 64)
	var st unix.Stat_t
	if err := unix.Stat(f.Mount, &st); err != nil {
		t.Fatal(err)
	}
	if err := diskProbe(f.Mount, st.Dev); err != nil {
		t.Fatalf("mounted: %v", err)
	}
	if out, err := exec.Command("umount", f.Mount).CombinedOutput(); err != nil {
		t.Fatalf("umount: %v %s", err, out)
	}
	err := diskProbe(f.Mount, st.Dev)
	if !errors.Is(err, errNotItsFilesystem) || !diskBroken(err) {
		t.Errorf("the unmounted filesystem's mountpoint: %v, want errNotItsFilesystem, counted as a failed disk", err)
	}
}

// TestDiskFailedMarksCrashedAgain: a disk that fails again after a resync
// cleared its copy's Crashed mark is marked again, though its name was
// already among the failed (from a review).
func TestDiskFailedMarksCrashedAgain(t *testing.T) {
	n, ms, _ := nodeWithCopy(t)
	n.diskFailed(0, errors.New("fsync: input/output error"))
	ms.Update(func(m *replica.Meta) { m.Crashed = false }) // a resync completed
	n.diskFailed(0, errors.New("fsync: input/output error"))
	if !ms.Get().Crashed {
		t.Errorf("the disk failed again, yet the copy is not marked Crashed")
	}
}

// devOf is path's device.
func devOf(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Dev
}

// TestNoVIPAfterFailing: a term that starts while the node fails as a
// crashed daemon does (the state_dir's watcher runs at a term's start)
// does not add the VIP once failAsCrashed has removed it: the daemon
// gone, the address left would keep the peer from taking over (from a
// review).
func TestNoVIPAfterFailing(t *testing.T) {
	n := testNode(t, t.TempDir())
	n.exit = func(int) {}
	n.failAsCrashed("test")
	n.vip = &vip.VIP{Prefix: netip.MustParsePrefix("10.250.9.9/24"), Iface: "duet-no-such-if"}
	n.vipFreeAt.Store(bootNanos()) // checks just made: no probe
	err := n.takeVIP(context.Background())
	if err == nil || !strings.Contains(err.Error(), "failing") {
		t.Errorf("takeVIP after failAsCrashed: %v, want a refusal before the address is added", err)
	}
}
