package lab

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/duet-ha/duet/tools/lab/faultnet"
)

// The standby's failure must never stall the primary's writers for longer
// than the fault-detection timeout (+ 0.5 s), nor fail their durability
// calls when cluster.alone_writes is release (the default).
const standbyStallBound = 1500*time.Millisecond + 500*time.Millisecond

// TestSecondaryCrashDoesNotStallPrimary: nodeB's host crashes (SIGKILL of
// everything on it, link down) under a synchronous writer on nodeA. The
// writer goes on within the bound, without an error; nodeA shows the data
// link down and runs ALONE; nodeB returns, resyncs, and the copies match.
func TestSecondaryCrashDoesNotStallPrimary(t *testing.T) {
	l, w := standbyLab(t)
	crashAt := time.Now()
	if out, err := l.run("crash", "b"); err != nil {
		t.Fatalf("crash b: %v\n%s", err, out)
	}
	sa := l.WaitState(t, "a", "ALONE", 10*time.Second)
	t.Logf("nodeB crashed: nodeA ALONE after %s", time.Since(crashAt).Round(time.Millisecond))
	before := readAcked(t, w.ack.Name())
	waitAcked(t, w, before+200, 10*time.Second)
	for _, d := range sa.Dirs {
		if d.Connected {
			t.Errorf("nodeA's data link to the crashed peer still shows connected: %+v", d)
		}
	}
	acked, stall, stderr := w.stop(t)
	t.Logf("secondary crash: writer acknowledged %d records, longest write+fdatasync %s (bound %s)%s",
		acked, stall.Round(time.Millisecond), standbyStallBound, errLine(stderr))
	if stderr != "" {
		t.Errorf("the writer failed: %s", stderr)
	}
	if stall > standbyStallBound {
		t.Errorf("the primary's writer stalled %s after the secondary's crash, bound %s", stall, standbyStallBound)
	}
	l.run("revive", "b")
	l.Start(t, "b")
	l.WaitState(t, "b", "SECOND", time.Minute)
	l.WaitSync(t, time.Minute)
	l.Verify(t)
}

// TestSecondaryDiskFullDoesNotStallPrimary: nodeB's filesystem (replica
// and state directory) fills up, root's reserve included, under a
// synchronous writer on nodeA. nodeB cannot apply: the writer goes on
// within the bound without an error, nodeA says why in its status and
// backs off; once space is freed nodeB catches up and the copies match.
func TestSecondaryDiskFullDoesNotStallPrimary(t *testing.T) {
	l, w := standbyLab(t)
	fill := filepath.Join(filepath.Dir(l.BData), "fill")
	filled, err := fillFilesystem(fill)
	if err != nil {
		t.Fatalf("filling nodeB's filesystem: %v", err)
	}
	t.Logf("nodeB's filesystem filled (%d MiB)", filled>>20)
	before := readAcked(t, w.ack.Name())
	waitAcked(t, w, before+300, 20*time.Second)
	// The writer goes on; nodeA says why nodeB does not follow.
	var why string
	deadline := time.Now().Add(10 * time.Second)
	for why == "" && time.Now().Before(deadline) {
		for _, d := range l.Status(t, "a").Dirs {
			if strings.Contains(d.PeerCannotApply, "no space left on device") {
				why = d.PeerCannotApply
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	if why == "" {
		t.Errorf("nodeA's status does not say that nodeB cannot apply (no space left on device)")
	}
	sb := l.Status(t, "b")
	if sb.State == "SECOND" {
		t.Errorf("nodeB is SECOND while it cannot apply: it could take over without the writer's records")
	}
	acked, stall, stderr := w.stop(t)
	t.Logf("secondary disk full: writer acknowledged %d records, longest write+fdatasync %s (bound %s); nodeA: %q; nodeB %s%s",
		acked, stall.Round(time.Millisecond), standbyStallBound, why, sb.State, errLine(stderr))
	if stderr != "" {
		t.Errorf("the writer failed: %s", stderr)
	}
	if stall > standbyStallBound {
		t.Errorf("the primary's writer stalled %s while the secondary's disk was full, bound %s", stall, standbyStallBound)
	}
	refusals := strings.Count(readFile(t, filepath.Join(l.Dir, "b.log")), "cannot apply replication batch")
	if err := os.Remove(fill); err != nil {
		t.Fatal(err)
	}
	t.Logf("space freed; nodeB refused %d batches while full", refusals)
	l.WaitState(t, "b", "SECOND", time.Minute)
	l.WaitSync(t, time.Minute)
	l.Verify(t)
}

// TestPathToSecondaryLostOneWay: every frame from nodeA is lost at
// nodeB's ingress for 15 s (heartbeats, batches, ARP), while nodeA still
// hears nodeB. nodeB, hearing nothing, sees the VIP answered and goes
// WAIT with a stale copy, which it says; nodeA's replication connection
// still looks alive (TCP retransmits into the void), so calls waited for
// acks that could not come, until the loss healed or 30 s (EIO). Now
// nodeA ends the connection once nodeB has not heard it for
// cluster.timeout, stops saying "synced", and releases once no "synced"
// heartbeat of it can still be accepted: the writer goes on within
// pathLossStallBound, without an error, and nodeB catches up after.
func TestPathToSecondaryLostOneWay(t *testing.T) {
	l, w := standbyLab(t)
	d, err := faultnet.AttachInNetns("duet-b", "eth0")
	if err != nil {
		t.Skipf("cannot attach the packet-loss injector in duet-b (needs TCX BPF): %v", err)
	}
	defer d.Close()
	lossAt := time.Now()
	if err := d.Drop(hostAddr["a"], 1); err != nil {
		t.Fatal(err)
	}
	l.WaitState(t, "b", "WAIT", 10*time.Second)
	t.Logf("frames from nodeA lost at nodeB: nodeB WAIT after %s", time.Since(lossAt).Round(time.Millisecond))
	before := readAcked(t, w.ack.Name())
	waitAcked(t, w, before+100, 14*time.Second)
	t.Logf("the writer went on %s after the loss began", time.Since(lossAt).Round(time.Millisecond))
	time.Sleep(time.Until(lossAt.Add(15 * time.Second)))
	if err := d.Heal(hostAddr["a"]); err != nil {
		t.Fatal(err)
	}
	acked, stall, stderr := w.stop(t)
	t.Logf("path to the secondary lost one way for 15 s: writer acknowledged %d records, longest write+fdatasync %s (bound %s)%s",
		acked, stall.Round(time.Millisecond), pathLossStallBound, errLine(stderr))
	if stderr != "" {
		t.Errorf("the writer failed: %s", stderr)
	}
	if stall > pathLossStallBound {
		t.Errorf("the primary's writer stalled %s while the path to the secondary lost its frames, bound %s", stall, pathLossStallBound)
	}
	l.WaitState(t, "b", "SECOND", time.Minute)
	l.WaitSync(t, time.Minute)
	l.Verify(t)
}

// pathLossStallBound: the peer's timeout and checks (about 2 s), then
// cluster.timeout until nodeA sees it does not hear it, then twice
// cluster.timeout until no "synced" heartbeat of nodeA can be accepted
// (node.staleCurrent), with 1.5 s to spare.
const pathLossStallBound = 2*time.Second + 3*1500*time.Millisecond + 1500*time.Millisecond

// standbyLab is a pair in sync, nodeA serving, with a writer (-timing)
// under duet exec on nodeA that has acknowledged 200 records.
func standbyLab(t *testing.T) (*Lab, *syncWriter) {
	b := duetBinary(t)
	writer := buildSyncWriter(t, b)
	l := Up(t, b)
	l.Start(t, "b")
	l.Start(t, "a")
	l.WaitState(t, "a", "PRIM", time.Minute)
	l.WaitSync(t, time.Minute)
	w := l.startSyncWriter(t, writer, "a", filepath.Join(l.AData, "log"), "-timing")
	waitAcked(t, w, 200, 30*time.Second)
	return l, w
}

func buildSyncWriter(t *testing.T, duet string) string {
	t.Helper()
	writer := filepath.Join(filepath.Dir(duet), "syncwriter")
	build := exec.Command("go", "build", "-o", writer, "./tools/syncwriter")
	build.Dir = repoRoot()
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("building syncwriter: %v\n%s", err, out)
	}
	return writer
}

// waitAcked waits until the writer acknowledged n records.
func waitAcked(t *testing.T, w *syncWriter, n int, timeout time.Duration) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for readAcked(t, w.ack.Name()) < n {
		if w.cmd.ProcessState != nil || time.Now().After(deadline) {
			t.Fatalf("the writer acknowledged %d records, waited for %d (%s): %s",
				readAcked(t, w.ack.Name()), n, timeout, w.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// stop ends a writer started with -timing and returns its last record,
// the longest write+sync it saw and its error output.
func (w *syncWriter) stop(t *testing.T) (int, time.Duration, string) {
	t.Helper()
	syscall.Kill(-w.cmd.Process.Pid, syscall.SIGTERM)
	done := make(chan struct{})
	go func() {
		w.cmd.Wait()
		close(done)
	}()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		syscall.Kill(-w.cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
	w.ack.Close()
	var longest time.Duration
	for _, line := range strings.Split(strings.TrimSpace(readFile(t, w.ack.Name())), "\n") {
		f := strings.Fields(line)
		if len(f) != 2 {
			continue
		}
		us, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			t.Fatalf("bad timing line %q", line)
		}
		longest = max(longest, time.Duration(us)*time.Microsecond)
	}
	// Killed by the test's SIGTERM, the wrappers print nothing; a
	// durability call that failed makes the writer say so.
	var errs []string
	for _, l := range strings.Split(w.stderr.String(), "\n") {
		if strings.Contains(l, "syncwriter:") {
			errs = append(errs, strings.TrimSpace(l))
		}
	}
	return readAcked(t, w.ack.Name()), longest, strings.Join(errs, "; ")
}

func errLine(s string) string {
	if s == "" {
		return ", no error"
	}
	return "; writer: " + s
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	return string(b)
}

// fillFilesystem allocates every free block of the filesystem holding
// path (root's reserve included: the test runs as root) into path, and
// returns how many bytes path holds. Called again on the same path, it
// takes what was freed since: XFS gives back the blocks it allocated
// ahead of a file's end when the file is closed (a killed process's
// files), and frees a removed file's blocks in the background.
func fillFilesystem(path string) (int64, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	// Pending frees first (XFS's syncfs waits for its background
	// inactivation of removed files).
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		return 0, fmt.Errorf("syncfs: %w", err)
	}
	fi, err := f.Stat()
	if err != nil {
		return 0, err
	}
	total := fi.Size()
	for chunk := int64(1 << 30); chunk >= 4096; {
		err := unix.Fallocate(int(f.Fd()), 0, total, chunk)
		if err == nil {
			total += chunk
			continue
		}
		if !errors.Is(err, unix.ENOSPC) {
			return total, fmt.Errorf("fallocate: %w", err)
		}
		chunk /= 2
	}
	return total, f.Sync()
}
