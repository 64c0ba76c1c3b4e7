package lab

import (
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/replica"
)

// fillFile writes size bytes of pseudo-random data (incompressible: the
// wire figures are then the data's) to path.
func fillFile(t *testing.T, path string, size int, rng *rand.Rand) {
	t.Helper()
	os.MkdirAll(filepath.Dir(path), 0o755)
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 1<<20)
	for left := size; left > 0; left -= len(buf) {
		rng.Read(buf)
		if _, err := f.Write(buf[:min(left, len(buf))]); err != nil {
			t.Fatal(err)
		}
	}
}

// smallTree makes n files of size bytes under dir/tree.
func smallTree(t *testing.T, dir string, n, size int, rng *rand.Rand) {
	t.Helper()
	for i := range n {
		fillFile(t, filepath.Join(dir, "tree", fmt.Sprintf("f%03d", i)), size, rng)
	}
}

// scatter writes count random 4 KiB blocks at random 4 KiB offsets of
// path (size bytes) and returns how many distinct bytes it changed.
func scatter(t *testing.T, path string, size, count int, rng *rand.Rand) int {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	seen := map[int]bool{}
	for range count {
		blk := rng.Intn(size / 4096)
		rng.Read(buf)
		if _, err := f.WriteAt(buf, int64(blk)*4096); err != nil {
			t.Fatal(err)
		}
		seen[blk] = true
	}
	return len(seen) * 4096
}

// mutate changes a tree made by smallTree plus big.img while the peer is
// away: scattered writes into the big file, new files, removals, renames.
// It returns the bytes modified (written or created).
func mutate(t *testing.T, dir string, round int, rng *rand.Rand) int {
	t.Helper()
	modified := scatter(t, filepath.Join(dir, "big.img"), bigSize, 2048, rng)
	for i := range 10 {
		fillFile(t, filepath.Join(dir, "tree", fmt.Sprintf("new-%d-%d", round, i)), 64<<10, rng)
		modified += 64 << 10
	}
	for i := range 5 {
		os.Remove(filepath.Join(dir, "tree", fmt.Sprintf("f%03d", round*10+i)))
		old := filepath.Join(dir, "tree", fmt.Sprintf("f%03d", round*10+5+i))
		if err := os.Rename(old, old+"-renamed"); err != nil {
			t.Fatal(err)
		}
	}
	return modified
}

const bigSize = 256 << 20

// logResync prints the last resync decision in host's log.
func (l *Lab) logResync(t *testing.T, host string) {
	t.Helper()
	l.logLast(t, host, "resync: comparing with the peer")
}

// logLast prints the last line of host's log that holds msg.
func (l *Lab) logLast(t *testing.T, host, msg string) {
	t.Helper()
	b, _ := os.ReadFile(filepath.Join(l.Dir, host+".log"))
	lines := strings.Split(string(b), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.Contains(lines[i], msg) {
			_, msg, _ := strings.Cut(lines[i], "msg=")
			t.Logf("%s: %s", nodeName[host], msg)
			return
		}
	}
}

// resyncLab is a lab with margin 1s, a 256 MiB file and 60 small files on
// nodeA, both nodes started and in sync.
func resyncLab(t *testing.T, extra string) (*Lab, *rand.Rand) {
	l := Up(t, duetBinary(t))
	for _, h := range []string{"a", "b"} {
		l.AppendConfig(t, h, "resync:\n  margin: 1s\n"+extra)
	}
	rng := rand.New(rand.NewSource(6))
	fillFile(t, filepath.Join(l.AData, "big.img"), bigSize, rng)
	smallTree(t, l.AData, 60, 64<<10, rng)
	l.Start(t, "b")
	l.Start(t, "a")
	l.WaitState(t, "b", "SECOND", 30*time.Second)
	l.WaitSync(t, 2*time.Minute)
	return l, rng
}

// checkSent fails unless the bytes a resync read for sending are within
// 1.1 × the bytes modified plus 256 KiB.
func checkSent(t *testing.T, what string, sent, wire uint64, modified int) {
	t.Helper()
	limit := uint64(float64(modified)*1.1) + 256<<10
	t.Logf("%s: %d bytes modified, %d bytes of data sent (%.3f×), %d bytes on the wire", what, modified, sent,
		float64(sent)/float64(modified), wire)
	if sent > limit {
		t.Fatalf("%s: sent %d bytes for %d modified: over 1.1× + 256 KiB (%d)", what, sent, modified, limit)
	}
}

// TestResyncAfterCleanStop: scattered writes, creates, removals and renames
// while the secondary is stopped cleanly must cost about what changed:
// once with the primary running on (its journal), once with the primary
// also stopped and restarted in between (its bitmap, saved at the stop).
func TestResyncAfterCleanStop(t *testing.T) {
	l, rng := resyncLab(t, "")

	before := l.Status(t, "a").Dirs[0]
	l.Stop(t, "b")
	l.WaitState(t, "a", "ALONE", 30*time.Second)
	modified := mutate(t, l.AData, 0, rng)
	l.Start(t, "b")
	l.WaitSync(t, 2*time.Minute)
	l.Verify(t)
	after := l.Status(t, "a").Dirs[0]
	checkSent(t, "secondary stopped, primary running", after.DataBytes-before.DataBytes, after.WireBytes-before.WireBytes, modified)

	l.Stop(t, "b")
	l.WaitState(t, "a", "ALONE", 30*time.Second)
	modified = mutate(t, l.AData, 1, rng)
	l.Stop(t, "a")
	l.logLast(t, "a", "modification bitmap saved")
	if _, err := os.Stat(filepath.Join(l.Dir, "a/.duet/bitmap-data")); err != nil {
		t.Fatalf("no modification bitmap saved at nodeA's clean stop: %v", err)
	}
	// While duet is stopped: a same-size change in place whose mtime is
	// set back (as `rsync -t` or a restore does); only its ctime tells.
	// Nothing captured it: the bitmap alone missed it.
	quiet := filepath.Join(l.AData, "tree", "f040")
	fi, err := os.Stat(quiet)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(quiet, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	patch := make([]byte, 4096)
	rng.Read(patch)
	if _, err := f.WriteAt(patch, 8192); err != nil {
		t.Fatal(err)
	}
	f.Close()
	must(t, os.Chtimes(quiet, fi.ModTime(), fi.ModTime()))
	modified += len(patch)
	l.Start(t, "a")
	l.WaitState(t, "a", "ALONE", 30*time.Second)
	// A change in this term too: the journal holds it when the resync
	// begins, and the resync takes it over.
	fillFile(t, filepath.Join(l.AData, "tree", "while-alone"), 64<<10, rng)
	modified += 64 << 10
	l.Start(t, "b")
	l.WaitSync(t, 2*time.Minute)
	l.Verify(t)
	d := l.Status(t, "a").Dirs[0]
	if d.Resync.Mode != "bitmap+recent" {
		t.Fatalf("resync after clean stops of both nodes ran in mode %q, want bitmap+recent (the bitmap, and the files changed while duet was stopped)", d.Resync.Mode)
	}
	t.Logf("resync (%s): %d of %d files compared by checksums, %d files sent", d.Resync.Mode,
		d.Resync.FilesCompared, d.Resync.FilesTotal, d.Resync.FilesSent)
	checkSent(t, "both stopped, bitmap", d.DataBytes, d.WireBytes, modified)
	// Changes after the resync flow as before: in the files and the
	// directories the resync covered too.
	fillFile(t, filepath.Join(l.AData, "tree", "after-resync"), 100<<10, rng)
	scatter(t, filepath.Join(l.AData, "big.img"), bigSize, 16, rng)
	l.WaitSync(t, time.Minute)
	l.Verify(t)
}

// writer changes a few files of dir/tree (random 4 KiB writes) until
// stopped; it returns the names it wrote.
type writer struct {
	stop  chan struct{}
	done  chan struct{}
	n     atomic.Int64
	mu    sync.Mutex
	names map[string]bool
}

func startWriter(t *testing.T, dir string, files int, seed int64) *writer {
	w := &writer{stop: make(chan struct{}), done: make(chan struct{}), names: map[string]bool{}}
	go func() {
		defer close(w.done)
		rng := rand.New(rand.NewSource(seed))
		buf := make([]byte, 4096)
		for {
			select {
			case <-w.stop:
				return
			default:
			}
			name := fmt.Sprintf("w%02d", rng.Intn(files))
			f, err := os.OpenFile(filepath.Join(dir, "tree", name), os.O_WRONLY|os.O_CREATE, 0o644)
			if err != nil {
				t.Errorf("writer: %v", err)
				return
			}
			rng.Read(buf)
			f.WriteAt(buf, int64(rng.Intn(64))*4096)
			f.Close()
			w.mu.Lock()
			w.names[name] = true
			w.mu.Unlock()
			w.n.Add(1)
			time.Sleep(5 * time.Millisecond)
		}
	}()
	return w
}

func (w *writer) halt() int64 {
	close(w.stop)
	<-w.done
	return w.n.Load()
}

// TestResyncAfterSecondaryCrash: the secondary crashes (SIGKILL, link
// down) while a writer runs, and comes back as after a reboot (its
// progress file void). Only the files changed since the sync point may be
// compared by checksums, not the whole tree.
func TestResyncAfterSecondaryCrash(t *testing.T) {
	l, rng := resyncLab(t, "")
	smallTree(t, l.AData, 200, 256<<10, rng) // more files to leave alone
	l.WaitSync(t, time.Minute)
	// The sync points move past the tree's creation.
	time.Sleep(12 * time.Second)
	w := startWriter(t, l.AData, 8, 1)
	time.Sleep(time.Second)
	if out, err := l.run("crash", "b"); err != nil {
		t.Fatalf("crash b: %v\n%s", err, out)
	}
	time.Sleep(2 * time.Second)
	writes := w.halt()
	// A reboot voids the replica's progress file (boot id): without it the
	// same-boot restart would resume the session instead.
	os.Remove(filepath.Join(l.Dir, "b/.duet/replica-data.state"))
	if out, err := l.run("revive", "b"); err != nil {
		t.Fatalf("revive b: %v\n%s", err, out)
	}
	l.Start(t, "b")
	l.WaitSync(t, 2*time.Minute)
	l.Verify(t)
	l.logResync(t, "a")
	r := l.Status(t, "a").Dirs[0].Resync
	t.Logf("secondary crash during %d writes: resync (%s) compared %d of %d files by checksums, sent %d files, %d bytes",
		writes, r.Mode, r.FilesCompared, r.FilesTotal, r.FilesSent, r.BytesSent)
	if !strings.Contains(r.Mode, "recent") {
		t.Fatalf("resync after a secondary crash ran in mode %q: the crashed copy's recent files were not compared", r.Mode)
	}
	if r.FilesCompared > 20 || r.FilesTotal < 200 {
		t.Fatalf("compared %d of %d files: want only the ones changed since the sync point (the writer touched 8)", r.FilesCompared, r.FilesTotal)
	}
}

// TestFailbackAfterPrimaryCrash: the primary, cut off, writes things its
// peer never gets, then crashes; the peer takes over and writes too. The
// old primary returns as secondary with the new primary's data, and its
// own unreplicated changes are listed in a report.
func TestFailbackAfterPrimaryCrash(t *testing.T) {
	l, _ := resyncLab(t, "")
	time.Sleep(12 * time.Second) // nodeA's sync point moves past the setup
	// nodeA is cut off: what it writes now never reaches nodeB.
	if out, err := l.run("exec", "a", "ip", "link", "set", "eth0", "down"); err != nil {
		t.Fatalf("link down: %v\n%s", err, out)
	}
	os.WriteFile(filepath.Join(l.AData, "tree", "only-on-a"), []byte("written by nodeA while cut off\n"), 0o644)
	f, err := os.OpenFile(filepath.Join(l.AData, "tree", "f007"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("nodeA's unreplicated change"), 8192)
	f.Close()
	if out, err := l.run("crash", "a"); err != nil {
		t.Fatalf("crash a: %v\n%s", err, out)
	}
	l.WaitState(t, "b", "ALONE", 30*time.Second)
	// The new primary's own changes.
	os.WriteFile(filepath.Join(l.BData, "tree", "only-on-b"), []byte("written by nodeB as primary\n"), 0o644)
	f, err = os.OpenFile(filepath.Join(l.BData, "tree", "f020"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("nodeB's change"), 0)
	f.Close()
	if out, err := l.run("revive", "a"); err != nil {
		t.Fatalf("revive a: %v\n%s", err, out)
	}
	l.Start(t, "a")
	l.WaitState(t, "a", "SECOND", time.Minute)
	l.WaitSync(t, 2*time.Minute)
	out, code := l.Duet(t, "b", "verify")
	if code != 0 {
		t.Fatalf("verify from nodeB: exit %d\n%s", code, out)
	}
	if _, err := os.Stat(filepath.Join(l.AData, "tree", "only-on-a")); err == nil {
		t.Fatal("nodeA's unreplicated file survived the resync")
	}
	l.logResync(t, "b")
	r := l.Status(t, "b").Dirs[0].Resync
	t.Logf("old primary back: resync (%s) compared %d of %d files, sent %d files, %d bytes; %d entries discarded",
		r.Mode, r.FilesCompared, r.FilesTotal, r.FilesSent, r.BytesSent, r.Discarded)
	if r.FilesCompared > 10 {
		t.Fatalf("compared %d files: want only those changed since nodeA's sync point (4 were)", r.FilesCompared)
	}
	reports, _ := filepath.Glob(filepath.Join(l.Dir, "a/.duet/discarded-data-*.txt"))
	if len(reports) != 1 {
		t.Fatalf("want one discarded-changes report on nodeA, found %v", reports)
	}
	report, _ := os.ReadFile(reports[0])
	t.Logf("report %s:\n%s", filepath.Base(reports[0]), report)
	for _, want := range []string{"tree/only-on-a\tremoved", "tree/f007\t"} {
		if !strings.Contains(string(report), want) {
			t.Fatalf("report lacks %q", want)
		}
	}
	if strings.Contains(string(report), "f020") || strings.Contains(string(report), "only-on-b") {
		t.Fatal("report lists the new primary's own changes as discarded")
	}
}

// TestResyncResumesAfterCrash: a resync held to 20 MiB/s while a writer
// runs is cut by a crash of the secondary; after the restart it resumes
// with what was not yet on the secondary, and the copies end equal once
// the writer stops.
func TestResyncResumesAfterCrash(t *testing.T) {
	l, rng := resyncLab(t, "  rate_mib: 20\n")
	l.Stop(t, "b")
	l.WaitState(t, "a", "ALONE", 30*time.Second)
	for i := range 40 {
		fillFile(t, filepath.Join(l.AData, "new", fmt.Sprintf("n%02d", i)), 4<<20, rng)
	}
	l.Stop(t, "a") // the bitmap is saved: the next term resyncs from it
	l.Start(t, "a")
	l.WaitState(t, "a", "ALONE", 30*time.Second)
	w := startWriter(t, l.AData, 16, 2)
	l.Start(t, "b")
	var first replica.ResyncStatus
	deadline := time.Now().Add(time.Minute)
	for {
		first = l.Status(t, "a").Dirs[0].Resync
		if first.Active && first.BytesSent >= 60<<20 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("resync did not get to 60 MiB: %+v", first)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if out, err := l.run("crash", "b"); err != nil {
		t.Fatalf("crash b: %v\n%s", err, out)
	}
	time.Sleep(time.Second)
	os.Remove(filepath.Join(l.Dir, "b/.duet/replica-data.state"))
	l.run("revive", "b")
	l.Start(t, "b")
	time.Sleep(3 * time.Second)
	writes := w.halt()
	l.WaitSync(t, 3*time.Minute)
	l.Verify(t)
	second := l.Status(t, "a").Dirs[0].Resync
	t.Logf("first resync (%s): %d of %d MiB sent when the secondary crashed; after the restart (%s): %d MiB planned, %d sent in %s at ≤ 20 MiB/s; writer: %d writes during both",
		first.Mode, first.BytesSent>>20, first.BytesPlanned>>20, second.Mode, second.BytesPlanned>>20, second.BytesSent>>20,
		second.Ended.Sub(second.Started).Round(time.Millisecond), writes)
	if second.BytesPlanned >= first.BytesPlanned {
		t.Fatalf("the resync after the crash planned %d bytes, the first %d: it did not resume", second.BytesPlanned, first.BytesPlanned)
	}
	if rate := float64(second.BytesSent) / second.Ended.Sub(second.Started).Seconds(); rate > 24<<20 {
		t.Fatalf("resync ran at %.1f MiB/s, over the 20 MiB/s bound", rate/(1<<20))
	}
}

// TestFailbackToPreferred: with cluster.prefer, the preferred node gets
// the role back by itself once it has returned and been a mirror for
// failback_delay, and the service answers from it again.
func TestFailbackToPreferred(t *testing.T) {
	l, hello := clusterLab(t, false)
	for _, h := range []string{"a", "b"} {
		l.AppendConfig(t, h, "resync:\n  margin: 1s\n")
		l.EditConfig(t, h, "cluster:\n", "cluster:\n  prefer: nodeA\n  failback_delay: 2s\n")
	}
	l.Start(t, "b")
	l.Start(t, "a")
	l.WaitState(t, "a", "PRIM", 30*time.Second)
	l.WaitSync(t, time.Minute)
	if out, err := l.run("crash", "a"); err != nil {
		t.Fatalf("crash a: %v\n%s", err, out)
	}
	l.WaitState(t, "b", "ALONE", 30*time.Second)
	os.WriteFile(filepath.Join(l.BData, "while-a-was-away"), []byte("nodeB served\n"), 0o644)
	l.run("revive", "a")
	start := time.Now()
	l.Start(t, "a")
	l.WaitState(t, "a", "PRIM", time.Minute)
	back := time.Since(start)
	ms, ans := l.connect(t, hello, time.Now())
	if ans != "hello from nodeA" {
		t.Fatalf("after the failback the service answered %q", ans)
	}
	l.WaitSync(t, time.Minute)
	l.Verify(t)
	if b, err := os.ReadFile(filepath.Join(l.AData, "while-a-was-away")); err != nil || string(b) != "nodeB served\n" {
		t.Fatalf("nodeB's change is not on nodeA after the failback: %q, %v", b, err)
	}
	t.Logf("failback: nodeA restarted, resynced and serving again %s later (failback_delay 2s); the service answered from nodeA in %d ms", back.Round(100*time.Millisecond), ms)
}

// TestResyncAfterRotation: a backup rotation (`rm -r b.2; mv b.1 b.2;
// touch b.2/stamp`) whose moved files have the names, sizes and times of
// the ones they replace, other bytes. First while nodeB is stopped and
// with a clean stop and start of nodeA before nodeB returns (the bitmap,
// and the moved directory marked at the stop); then while duet is
// stopped on both (nothing captures it: the window since the bitmap was
// saved). Trusted by size and mtime, the peer would keep the removed
// files' bytes under the moved ones' names: duet verify fails.
func TestResyncAfterRotation(t *testing.T) {
	l, rng := resyncLab(t, "")
	old := time.Now().Add(-time.Hour)
	versions := func() {
		for _, d := range []string{"b.1", "b.2"} {
			for i := range 4 {
				p := filepath.Join(l.AData, "rot", d, fmt.Sprintf("f%d", i))
				fillFile(t, p, 20000+i*4096, rng)
				must(t, os.Chtimes(p, old, old))
			}
		}
	}
	rotate := func() {
		must(t, os.RemoveAll(filepath.Join(l.AData, "rot", "b.2")))
		must(t, os.Rename(filepath.Join(l.AData, "rot", "b.1"), filepath.Join(l.AData, "rot", "b.2")))
		must(t, os.WriteFile(filepath.Join(l.AData, "rot", "b.2", "stamp"), nil, 0o644))
	}
	// nodeA started, then nodeB, which nodeA resyncs: the copies must
	// be the same.
	startBoth := func() {
		l.Start(t, "a")
		l.WaitState(t, "a", "ALONE", 30*time.Second)
		l.Start(t, "b")
		l.WaitSync(t, 2*time.Minute)
		l.Verify(t)
		l.logResync(t, "a")
	}
	versions()
	l.WaitSync(t, time.Minute)
	// The versions' own marks forgotten (the primary clears what the peer
	// made durable at its next sync point, every 5 s): a file with marks
	// only for its times is compared anyway (markMoved).
	time.Sleep(7 * time.Second)

	l.Stop(t, "b")
	l.WaitState(t, "a", "ALONE", 30*time.Second)
	rotate()
	// Older than the window the next term compares by times (the
	// bitmap's save time − the margin, 1 s here): only the bitmap tells.
	time.Sleep(2 * time.Second)
	l.Stop(t, "a")
	l.logLast(t, "a", "modification bitmap: entries")
	startBoth()

	// Again, with the rotation made while duet is stopped on both nodes.
	must(t, os.RemoveAll(filepath.Join(l.AData, "rot")))
	versions()
	l.WaitSync(t, time.Minute)
	l.Stop(t, "b")
	l.WaitState(t, "a", "ALONE", 30*time.Second)
	l.Stop(t, "a")
	rotate()
	startBoth()
}

// TestDivergedReplicaIsRepaired: a directory removed from the replica's
// copy behind duet's back (by hand, or by a bug: the applier once removed
// a tree that a rename's target held, docs/DESIGN.md §8), then a file in
// it renamed on the primary. The replica cannot apply the rename, and
// refused it at every retry: the pair never got in sync again. It now
// says its tree does not fit the batch, and the primary compares every
// file with it and ships what it lost.
func TestDivergedReplicaIsRepaired(t *testing.T) {
	l := Up(t, duetBinary(t))
	rng := rand.New(rand.NewSource(8))
	for i := range 3 {
		fillFile(t, filepath.Join(l.AData, "keep", "sub", fmt.Sprintf("f%d", i)), 40000+i, rng)
	}
	fillFile(t, filepath.Join(l.AData, "keep", "g"), 5000, rng)
	l.Start(t, "b")
	l.Start(t, "a")
	l.WaitState(t, "b", "SECOND", 30*time.Second)
	l.WaitSync(t, 2*time.Minute)
	must(t, os.RemoveAll(filepath.Join(l.BData, "keep")))
	must(t, os.Rename(filepath.Join(l.AData, "keep", "sub", "f0"), filepath.Join(l.AData, "keep", "sub", "f0.old")))
	l.WaitSync(t, time.Minute)
	l.Verify(t)
	d := l.Status(t, "a").Dirs[0]
	if d.DivergedResyncs == 0 {
		t.Fatalf("in sync without a comparison begun by the replica's refusal: the test no longer builds the case (%+v)", d)
	}
	t.Logf("comparisons begun by a refusal: %d; last resync: %s, %d files compared, %d sent",
		d.DivergedResyncs, d.Resync.Mode, d.Resync.FilesCompared, d.Resync.FilesSent)
}
