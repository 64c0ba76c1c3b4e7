package replica

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/loopfs"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// The secondary daemon is SIGKILLed with batches 1-4 applied and
// acknowledged (not durable): their 40 MiB live only in the page cache
// (modelled, as TestResumeAfterCacheLostWithoutReboot does, by a syncfs
// that does nothing: the killed daemon's connection flushes nothing).
// While it is down, the disk fails their writeback, and another process
// on the host sees the error first (a syncfs: `sync -f`, a database's
// start-up, or the connection of another replicated directory on the same
// filesystem). The restarted daemon resumes session 7 after batch 4 (same
// boot, same mount: the state file is trusted, and Meta.Crashed is cleared
// as "the daemon's crash lost nothing the page cache did not keep"); its
// new applier's root descriptor is opened after the error was seen, so
// its first syncfs returns 0, and batch 4 is acknowledged durable while
// the replica's disk never received it. The primary then forgets the
// batches for good: silent divergence, data loss on failover.
func TestS46RestartAfterKillMissesWritebackErrorSeenElsewhere(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "data")
	loopfs.Failing(t, data)
	stateDir := filepath.Join(dir, "state")
	s := s46Secondary(t, stateDir, data)
	s.syncfs = func(int) error { return nil } // the killed daemon flushes nothing
	p := s.connect(t, 7)
	sendLost(p)
	p.c.Close()
	s.waitEnded(t, "data")
	// Another process's syncfs on the filesystem, while duet is down.
	err := syncfsOf(data)
	if err == nil {
		t.Fatal("precondition: syncfs of 40 MiB on a disk that takes 24 succeeded")
	}
	t.Logf("another process's syncfs while duet was down: %v", err)

	// The daemon restarts.
	s2 := s46Secondary(t, stateDir, data)
	p = s2.connect(t, 7)
	if p.w.Session != 7 || p.w.Applied < 1 {
		t.Logf("welcome: session %d applied %d: not resumed, the primary resyncs", p.w.Session, p.w.Applied)
		return
	}
	p.send(&wire.Frame{Type: wire.TypeSync, Seq: p.w.Applied})
	p.c.SetReadDeadline(time.Now().Add(20 * time.Second))
	f, err := p.read()
	if err != nil || f.Type != wire.TypeAck || f.Flags&wire.FlagDurable == 0 {
		t.Logf("sync answered %s seq %d flags %#x %q (%v)", f.Type, f.Seq, f.Flags, f.Payload, err)
		return
	}
	// What the disk holds of f: its cached pages dropped, read again.
	onDisk := "?"
	if fh, err := os.Open(filepath.Join(data, "f")); err == nil {
		unix.Fadvise(int(fh.Fd()), 0, 0, unix.FADV_DONTNEED)
		buf := make([]byte, 16)
		n, rerr := fh.ReadAt(buf, 38<<20)
		fh.Close()
		onDisk = fmt.Sprintf("%q (%v)", buf[:n], rerr)
	}
	t.Fatalf("restarted daemon resumed session 7 after batch %d and acknowledged it durable (ack %d flags %#x), "+
		"though the disk failed those batches' writeback while it was down; f at 38 MiB as read back from disk: %s", p.w.Applied, f.Seq, f.Flags, onDisk)
}

// TestS46RestartAfterKillOtherDirSeesErrorFirst: as above, with no other
// process: the restarted daemon replicates two directories on the same
// filesystem; the other directory's connection comes first and its first
// flush (a syncfs) takes the writeback error (and refuses, rightly); the
// connection of "data", which comes after, resumes and acknowledges the
// lost batches durable.
func TestS46RestartAfterKillOtherDirSeesErrorFirst(t *testing.T) {
	dir := t.TempDir()
	mnt := filepath.Join(dir, "mnt")
	loopfs.Failing(t, mnt)
	data, other := filepath.Join(mnt, "data"), filepath.Join(mnt, "other")
	for _, d := range []string{data, other} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	stateDir := filepath.Join(dir, "state")
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	dirs := []Dir{{Name: "data", Path: data}, {Name: "other", Path: other}}
	s := serveTestSecondary(t, &Server{Link: testLink, StateDir: stateDir, Dirs: dirs, Log: quiet, Metas: s46Metas(t, stateDir, dirs),
		syncfs: func(int) error { return nil }}, data) // the killed daemon flushes nothing
	p := s.connect(t, 7)
	sendLost(p)
	p.c.Close()
	s.waitEnded(t, "data")
	// The daemon restarts; the other directory's primary connects first
	// and asks for a durable sync.
	s2 := serveTestSecondary(t, &Server{Link: testLink, StateDir: stateDir, Dirs: dirs, Log: quiet, Metas: s46Metas(t, stateDir, dirs)}, data)
	c, _, err := dialPeer(context.Background(), testLink, &net.Dialer{}, s2.addr, wire.Hello{Purpose: wire.PurposeReplicate, Session: 9, Dir: "other"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	po := &peerConn{t: t, c: c, br: bufio.NewReader(c)}
	po.send(&wire.Frame{Type: wire.TypeSync, Seq: 0})
	fo, err := po.read()
	t.Logf("the other directory's first sync: %s %q (%v)", fo.Type, fo.Payload, err)
	if err != nil || fo.Type != wire.TypeError {
		t.Fatalf("precondition: the other directory's first flush should see the writeback error")
	}
	p = s2.connect(t, 7)
	if p.w.Session != 7 || p.w.Applied < 1 {
		t.Logf("welcome: session %d applied %d: not resumed, the primary resyncs", p.w.Session, p.w.Applied)
		return
	}
	p.send(&wire.Frame{Type: wire.TypeSync, Seq: p.w.Applied})
	f, err := p.read()
	if err == nil && f.Type == wire.TypeAck && f.Flags&wire.FlagDurable != 0 {
		t.Fatalf("restarted daemon resumed session 7 after batch %d and acknowledged it durable (ack %d flags %#x) after its other directory's flush saw the disk lose those batches' writeback",
			p.w.Applied, f.Seq, f.Flags)
	}
	t.Logf("sync answered %s seq %d flags %#x %q (%v)", f.Type, f.Seq, f.Flags, f.Payload, err)
}

// s46Metas opens the copies' state as the daemon does at its start
// (OpenMeta): a run that did not stop cleanly left its running marker, and
// the next finds its copies Crashed.
func s46Metas(t *testing.T, stateDir string, dirs []Dir) map[string]*MetaStore {
	t.Helper()
	if err := os.MkdirAll(stateDir, 0o700); err != nil {
		t.Fatal(err)
	}
	m := map[string]*MetaStore{}
	for _, d := range dirs {
		ms, err := OpenMeta(stateDir, d.Name)
		if err != nil {
			t.Fatal(err)
		}
		m[d.Name] = ms
	}
	return m
}

// s46Secondary is a secondary of the one directory data, with its copy's
// state, as the daemon runs it.
func s46Secondary(t *testing.T, stateDir, data string) *testSecondary {
	t.Helper()
	dirs := []Dir{{Name: "data", Path: data}}
	return serveTestSecondary(t, &Server{Link: testLink, StateDir: stateDir, Dirs: dirs,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)), Metas: s46Metas(t, stateDir, dirs)}, data)
}
