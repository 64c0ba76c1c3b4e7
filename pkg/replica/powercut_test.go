package replica

import (
	"bytes"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
	"unsafe"

	"github.com/duet-ha/duet/pkg/journal"
	"github.com/duet-ha/duet/pkg/loopfs"
	"github.com/duet-ha/duet/pkg/wire"
	"golang.org/x/sys/unix"
)

// powerCutCase: setup is applied and made durable (batch 1, sync 1);
// then change alone is applied and acknowledged durable (batch 2, sync
// 2); the power goes; check looks at the replica's tree after it.
type powerCutCase struct {
	name   string
	setup  []wire.Op
	change []wire.Op
	check  func(t *testing.T, data string)
}

func runPowerCut(t *testing.T, fstype string, mib int, c powerCutCase) {
	fs := loopfs.Make(t, fstype, mib)
	data := filepath.Join(fs.Mount, "data")
	if err := os.Mkdir(data, 0o755); err != nil {
		t.Fatal(err)
	}
	srv := &Server{Link: testLink, StateDir: filepath.Join(t.TempDir(), "state"),
		Dirs: []Dir{{Name: "data", Path: data}}, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
	s := serveTestSecondary(t, srv, data)
	p := s.connect(t, 7)
	p.batch(1, c.setup...)
	p.ack(1, 0)
	p.send(&wire.Frame{Type: wire.TypeSync, Seq: 1})
	p.ack(1, wire.FlagDurable)
	// Let every background flush of the setup settle: the change's
	// flush must stand on its own.
	time.Sleep(100 * time.Millisecond)
	p.batch(2, c.change...)
	p.ack(2, 0)
	p.send(&wire.Frame{Type: wire.TypeSync, Seq: 2})
	p.ack(2, wire.FlagDurable) // the primary now releases the durability call
	powerCutAfterAck(t, fs, s, p)
	c.check(t, data)
}

// waitEnded waits until directory dir's replication connection has ended
// (at most 5 s).
func (s *testSecondary) waitEnded(t *testing.T, dir string) {
	t.Helper()
	st := s.Stats(dir)
	for i := 0; st.Connected.Load(); i++ {
		if i > 500 {
			t.Fatal("the replication connection did not end")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// syncfsOf syncs the filesystem holding path, as another process would.
func syncfsOf(path string) error {
	d, err := os.Open(path)
	if err != nil {
		return err
	}
	defer d.Close()
	return unix.Syncfs(int(d.Fd()))
}

// powerCutAfterAck cuts the power right after the durable ack, before
// anything else (the connection's end syncs) can flush.
func powerCutAfterAck(t *testing.T, fs *loopfs.FS, s *testSecondary, p *peerConn) {
	t.Helper()
	powerCutShutdownOnly(t, fs)
	p.c.Close()
	s.waitEnded(t, "data")
	remount(t, fs)
}

func powerCutShutdownOnly(t *testing.T, fs *loopfs.FS) {
	t.Helper()
	const fsIocShutdown = 0x8004587d
	const noLogFlush = 2
	fd, err := unix.Open(fs.Mount, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	flags := uint32(noLogFlush)
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), fsIocShutdown, uintptr(unsafe.Pointer(&flags))); errno != 0 {
		t.Skipf("FS_IOC_SHUTDOWN: %v", errno)
	}
}

func remount(t *testing.T, fs *loopfs.FS) {
	t.Helper()
	for try := 0; ; try++ {
		out, err := exec.Command("umount", fs.Mount).CombinedOutput()
		if err == nil {
			break
		}
		if try == 100 {
			t.Fatalf("umount %s: %v\n%s", fs.Mount, err, out)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if out, err := exec.Command("mount", fs.Dev, fs.Mount).CombinedOutput(); err != nil {
		t.Fatalf("mount after the power cut: %v\n%s", err, out)
	}
}

func lstat(t *testing.T, p string) unix.Stat_t {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatalf("after the power cut: %v", err)
	}
	return st
}

var powerCutT = time.Unix(1600000000, 0).UnixNano()

func powerCutCases() []powerCutCase {
	mkd := wire.Op{Code: wire.OpMkdir, Path: "d", Mode: 0o755}
	sym := wire.Op{Code: wire.OpSymlink, Path: "d/l", Path2: "target"}
	fifo := wire.Op{Code: wire.OpMknod, Path: "d/p", Mode: unix.S_IFIFO | 0o644}
	return []powerCutCase{
		{
			name:   "symlink-chown",
			setup:  []wire.Op{mkd, sym},
			change: []wire.Op{{Code: wire.OpSetattr, Path: "d/l", Mode: 0o777, UID: 1234, GID: 1234, Mtime: powerCutT, Atime: powerCutT}},
			check: func(t *testing.T, data string) {
				st := lstat(t, filepath.Join(data, "d/l"))
				if st.Uid != 1234 || st.Mtim.Nano() != powerCutT {
					t.Errorf("symlink d/l after the power cut: uid %d mtime %d, acknowledged durable as uid 1234 mtime %d", st.Uid, st.Mtim.Nano(), powerCutT)
				}
			},
		},
		{
			name:   "fifo-chmod",
			setup:  []wire.Op{mkd, fifo},
			change: []wire.Op{{Code: wire.OpSetattr, Path: "d/p", Mode: 0o600, Mtime: powerCutT, Atime: powerCutT}},
			check: func(t *testing.T, data string) {
				st := lstat(t, filepath.Join(data, "d/p"))
				if st.Mode&0o7777 != 0o600 {
					t.Errorf("fifo d/p after the power cut: mode %o, acknowledged durable as 600", st.Mode&0o7777)
				}
			},
		},
		{
			name:   "file-chmod",
			setup:  []wire.Op{mkd, {Code: wire.OpCreate, Path: "d/f", Mode: 0o644}, {Code: wire.OpWrite, Path: "d/f", Data: []byte("x")}},
			change: []wire.Op{{Code: wire.OpSetattr, Path: "d/f", Mode: 0o600, Mtime: powerCutT, Atime: powerCutT}},
			check: func(t *testing.T, data string) {
				st := lstat(t, filepath.Join(data, "d/f"))
				if st.Mode&0o7777 != 0o600 {
					t.Errorf("file d/f after the power cut: mode %o, acknowledged durable as 600", st.Mode&0o7777)
				}
			},
		},
		{
			name:   "rename",
			setup:  []wire.Op{mkd, {Code: wire.OpMkdir, Path: "e", Mode: 0o755}, {Code: wire.OpCreate, Path: "d/f", Mode: 0o644}},
			change: []wire.Op{{Code: wire.OpRename, Path: "d/f", Path2: "e/g"}},
			check: func(t *testing.T, data string) {
				lstat(t, filepath.Join(data, "e/g"))
			},
		},
		{
			name:   "link",
			setup:  []wire.Op{mkd, {Code: wire.OpMkdir, Path: "e", Mode: 0o755}, {Code: wire.OpCreate, Path: "d/f", Mode: 0o644}},
			change: []wire.Op{{Code: wire.OpLink, Path: "d/f", Path2: "e/g"}},
			check: func(t *testing.T, data string) {
				if st := lstat(t, filepath.Join(data, "d/f")); st.Nlink != 2 {
					t.Errorf("nlink %d", st.Nlink)
				}
				lstat(t, filepath.Join(data, "e/g"))
			},
		},
		{
			name:   "truncate-write",
			setup:  []wire.Op{mkd, {Code: wire.OpCreate, Path: "d/f", Mode: 0o644}, {Code: wire.OpWrite, Path: "d/f", Data: make([]byte, 20000)}},
			change: []wire.Op{{Code: wire.OpTruncate, Path: "d/f", Off: 5}, {Code: wire.OpWrite, Path: "d/f", Off: 5, Data: []byte("tail")}},
			check: func(t *testing.T, data string) {
				if st := lstat(t, filepath.Join(data, "d/f")); st.Size != 9 {
					t.Errorf("size %d, want 9", st.Size)
				}
			},
		},
		{
			name:   "symlink-new",
			setup:  []wire.Op{mkd},
			change: []wire.Op{{Code: wire.OpSymlink, Path: "d/l2", Path2: "t2"}},
			check: func(t *testing.T, data string) {
				lstat(t, filepath.Join(data, "d/l2"))
			},
		},
		{
			name:   "remove",
			setup:  []wire.Op{mkd, {Code: wire.OpCreate, Path: "d/f", Mode: 0o644}},
			change: []wire.Op{{Code: wire.OpRemove, Path: "d/f"}},
			check: func(t *testing.T, data string) {
				if _, err := os.Lstat(filepath.Join(data, "d/f")); err == nil {
					t.Error("removed file is back")
				}
			},
		},
		{
			name:   "truncate-extend",
			setup:  []wire.Op{mkd, {Code: wire.OpCreate, Path: "d/f", Mode: 0o644}, {Code: wire.OpWrite, Path: "d/f", Data: []byte("x")}},
			change: []wire.Op{{Code: wire.OpTruncate, Path: "d/f", Off: 1 << 20}},
			check: func(t *testing.T, data string) {
				if st := lstat(t, filepath.Join(data, "d/f")); st.Size != 1<<20 {
					t.Errorf("size %d, want %d", st.Size, 1<<20)
				}
			},
		},
		{
			name:   "append",
			setup:  []wire.Op{mkd, {Code: wire.OpCreate, Path: "d/f", Mode: 0o644}, {Code: wire.OpWrite, Path: "d/f", Data: []byte("x")}},
			change: []wire.Op{{Code: wire.OpWrite, Path: "d/f", Off: 1, Data: []byte("appended")}},
			check: func(t *testing.T, data string) {
				if b, _ := os.ReadFile(filepath.Join(data, "d/f")); string(b) != "xappended" {
					t.Errorf("content %q", b)
				}
			},
		},
		{
			name:   "punch",
			setup:  []wire.Op{mkd, {Code: wire.OpCreate, Path: "d/f", Mode: 0o644}, {Code: wire.OpWrite, Path: "d/f", Data: bytesOf('a', 1<<20)}},
			change: []wire.Op{{Code: wire.OpPunch, Path: "d/f", Off: 0, Len: 1 << 20}},
			check: func(t *testing.T, data string) {
				b, _ := os.ReadFile(filepath.Join(data, "d/f"))
				if len(b) != 1<<20 || b[0] != 0 || b[len(b)-1] != 0 {
					t.Errorf("punched bytes back (len %d, first %q)", len(b), b[:1])
				}
			},
		},
		{
			name:   "dir-chmod",
			setup:  []wire.Op{mkd, {Code: wire.OpMkdir, Path: "d/s", Mode: 0o755}},
			change: []wire.Op{{Code: wire.OpSetattr, Path: "d/s", Mode: 0o700, Mtime: powerCutT, Atime: powerCutT}},
			check: func(t *testing.T, data string) {
				if st := lstat(t, filepath.Join(data, "d/s")); st.Mode&0o7777 != 0o700 {
					t.Errorf("mode %o", st.Mode&0o7777)
				}
			},
		},
	}
}

func bytesOf(c byte, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = c
	}
	return b
}

// TestPowerCutHarnessLoses is the harness's control: a change
// applied and acknowledged but never synced is lost by the power cut
// (so the cases above that pass are not passing by accident).
func TestPowerCutHarnessLoses(t *testing.T) {
	loopfs.RequireRoot(t)
	for _, fs := range []struct {
		fstype string
		mib    int
	}{{"ext4", 64}, {"xfs", 320}} {
		t.Run(fs.fstype, func(t *testing.T) {
			lfs := loopfs.Make(t, fs.fstype, fs.mib)
			data := filepath.Join(lfs.Mount, "data")
			os.Mkdir(data, 0o755)
			srv := &Server{Link: testLink, StateDir: filepath.Join(t.TempDir(), "state"),
				Dirs: []Dir{{Name: "data", Path: data}}, Log: slog.New(slog.NewTextHandler(io.Discard, nil))}
			s := serveTestSecondary(t, srv, data)
			p := s.connect(t, 7)
			p.batch(1, wire.Op{Code: wire.OpMkdir, Path: "d", Mode: 0o755}, wire.Op{Code: wire.OpCreate, Path: "d/f", Mode: 0o644})
			p.ack(1, 0)
			p.send(&wire.Frame{Type: wire.TypeSync, Seq: 1})
			p.ack(1, wire.FlagDurable)
			time.Sleep(100 * time.Millisecond)
			p.batch(2, wire.Op{Code: wire.OpSetattr, Path: "d/f", Mode: 0o600, Mtime: powerCutT, Atime: powerCutT})
			p.ack(2, 0)
			powerCutAfterAck(t, lfs, s, p)
			if st := lstat(t, filepath.Join(data, "d/f")); st.Mode&0o7777 == 0o600 {
				t.Error("control: an unsynced chmod survived the power cut: the harness does not lose anything")
			}
		})
	}
}

// TestPowerCutAfterDurableAck: what the secondary acknowledged
// durable (FlagDurable) survives a power cut of its host, for each kind
// of op alone in its sync window.
func TestPowerCutAfterDurableAck(t *testing.T) {
	loopfs.RequireRoot(t)
	for _, fs := range []struct {
		fstype string
		mib    int
	}{{"ext4", 64}, {"xfs", 320}} {
		for _, c := range powerCutCases() {
			t.Run(fs.fstype+"/"+c.name, func(t *testing.T) { runPowerCut(t, fs.fstype, fs.mib, c) })
		}
	}
}

// TestResumeAfterCacheLostWithoutReboot: the secondary daemon dies
// (no flush: modelled by a syncfs that does nothing, so the connection's
// end flushes nothing, as after a SIGKILL) with batch 1 applied and only
// in the page cache; then the replica's filesystem loses its page cache
// without the host rebooting (it shuts down on a disk error and is
// mounted again; the boot id does not change). The restarted daemon
// resumes the session after batch 1 and acknowledges it durable: the
// primary never sends it again, and the copy lacks it for good.
func TestResumeAfterCacheLostWithoutReboot(t *testing.T) {
	loopfs.RequireRoot(t)
	lfs := loopfs.Make(t, "ext4", 64)
	data := filepath.Join(lfs.Mount, "data")
	os.Mkdir(data, 0o755)
	unix.Sync() // the replica's directory itself is on disk
	stateDir := filepath.Join(t.TempDir(), "state")
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	first := serveTestSecondary(t, &Server{Link: testLink, StateDir: stateDir,
		Dirs: []Dir{{Name: "data", Path: data}}, Log: quiet, syncfs: func(int) error { return nil }}, data)
	p := first.connect(t, 7)
	p.batch(1, wire.Op{Code: wire.OpCreate, Path: "f", Mode: 0o644}, wire.Op{Code: wire.OpWrite, Path: "f", Data: []byte("batch 1")})
	p.ack(1, 0)
	powerCutAfterAck(t, lfs, first, p) // the daemon "killed", then the filesystem's cache lost
	again := serveTestSecondary(t, &Server{Link: testLink, StateDir: stateDir,
		Dirs: []Dir{{Name: "data", Path: data}}, Log: quiet}, data)
	p = again.connect(t, 7)
	if p.w.Session != 7 || p.w.Applied < 1 {
		t.Logf("welcome: session %d applied %d", p.w.Session, p.w.Applied)
		return // the session is not resumed: the primary resyncs
	}
	p.send(&wire.Frame{Type: wire.TypeSync, Seq: 1})
	f, err := p.read()
	_, lerr := os.Lstat(filepath.Join(data, "f"))
	t.Logf("after the restart: welcome applied %d; sync answered %s seq %d flags %#x %q (%v); f: %v", p.w.Applied, f.Type, f.Seq, f.Flags, f.Payload, err, lerr)
	if err == nil && f.Type == wire.TypeAck && f.Flags&wire.FlagDurable != 0 {
		if _, serr := os.Lstat(filepath.Join(data, "f")); serr != nil {
			t.Fatalf("welcome resumed session 7 after batch 1 and batch 1 was acknowledged durable (ack %d), but the replica lacks it: %v", f.Seq, serr)
		}
	}
}

// TestPowerCutReplacedByDirectory: a file written in the sync
// window keeps living under another name (a hard link made in the
// window, as `ln p q` does, and as the primary's builder keeps a
// replaced name's file aside with an OpLink), and its old name is then
// taken by a directory (OpMkdir over a non-directory removes it). The
// targeted flush flushes dirty paths by name: it fsyncs the new
// directory, never the file whose bytes the window wrote, and the sync
// is acknowledged durable.
func TestPowerCutReplacedByDirectory(t *testing.T) {
	loopfs.RequireRoot(t)
	c := powerCutCase{
		setup: []wire.Op{{Code: wire.OpMkdir, Path: "d", Mode: 0o755}, {Code: wire.OpCreate, Path: "d/p", Mode: 0o644}},
		change: []wire.Op{
			{Code: wire.OpWrite, Path: "d/p", Data: bytesOf('z', 64<<10)},
			{Code: wire.OpLink, Path: "d/p", Path2: "d/q"},
			{Code: wire.OpLink, Path: "d/p", Path2: "d/.duet-replaced-1"},
			{Code: wire.OpMkdir, Path: "d/p", Mode: 0o755},
		},
		check: func(t *testing.T, data string) {
			b, err := os.ReadFile(filepath.Join(data, "d/q"))
			if err != nil || len(b) != 64<<10 {
				t.Errorf("d/q after the power cut: %d bytes (%v), acknowledged durable with %d", len(b), err, 64<<10)
			}
		},
	}
	for _, fs := range []struct {
		fstype string
		mib    int
	}{{"ext4", 64}, {"xfs", 320}} {
		t.Run(fs.fstype, func(t *testing.T) { runPowerCut(t, fs.fstype, fs.mib, c) })
	}
}

// recordSink keeps every op the builder emits, data included.
type recordSink struct{ ops []wire.Op }

func (s *recordSink) add(op *wire.Op) error {
	c := *op
	c.Data = append([]byte(nil), op.Data...)
	s.ops = append(s.ops, c)
	return nil
}

// TestBuilderReplacedByDirectoryOps: what the primary's builder
// ships for `write p` (one pass), then `ln p q; rm p; mkdir p` (the next
// pass, before any sync): the ops of TestPowerCutReplacedByDirectory
// (the written inode linked under q and kept aside, then a directory made
// over p; no rename and no remove, which would make the replica's flush a
// syncfs). Those ops, synced and acknowledged durable, are then put
// through the power cut.
func TestBuilderReplacedByDirectoryOps(t *testing.T) {
	loopfs.RequireRoot(t)
	for _, q := range []string{"a", "q", "z"} {
		t.Run(q, func(t *testing.T) {
			src := filepath.Join(t.TempDir(), "src")
			writeRandom(t, filepath.Join(src, "d/p"), 100)
			root, local := scanSource(t, src)
			sink := &recordSink{}
			b := newBuilder(root, 0, newShadow(local), nil, sink, slog.New(slog.DiscardHandler), nil)
			p := filepath.Join(src, "d/p")
			f, err := os.OpenFile(p, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			f.WriteAt(bytesOf('z', 64<<10), 0)
			f.Close()
			if _, err := b.build([]journal.File{span(t, p, 0, 64<<10)}); err != nil {
				t.Fatal(err)
			}
			if err := os.Link(p, filepath.Join(src, "d", q)); err != nil {
				t.Fatal(err)
			}
			os.Remove(p)
			os.Mkdir(p, 0o755)
			if _, err := b.build([]journal.File{changed(t, filepath.Join(src, "d"))}); err != nil {
				t.Fatal(err)
			}
			var kinds []string
			safe := false // a rename or remove: the replica's flush is a syncfs
			for _, op := range sink.ops {
				kinds = append(kinds, op.Code.String()+" "+op.Path+" "+op.Path2)
				if op.Code == wire.OpRename || op.Code == wire.OpRemove {
					safe = true
				}
			}
			t.Logf("ops: %q", kinds)
			if safe {
				return
			}
			c := powerCutCase{
				setup:  []wire.Op{{Code: wire.OpMkdir, Path: "d", Mode: 0o755}, {Code: wire.OpCreate, Path: "d/p", Mode: 0o644}, {Code: wire.OpWrite, Path: "d/p", Data: bytesOf('y', 100)}},
				change: sink.ops,
				check: func(t *testing.T, data string) {
					b, err := os.ReadFile(filepath.Join(data, "d", q))
					if err != nil || !bytes.Equal(b, bytesOf('z', 64<<10)) {
						t.Errorf("d/%s after the power cut: %d bytes (%v), acknowledged durable as %d bytes of 'z'", q, len(b), err, 64<<10)
					}
				},
			}
			runPowerCut(t, "xfs", 320, c)
		})
	}
}

// TestResumeAfterCacheLostSymlinkedPath is TestResumeAfterCacheLostWithoutReboot
// with the replicated directory configured through a symlink
// (/var/lib/mysql -> /srv/mysql), which the replica follows
// (fstree.OpenRoot): mountID must follow it too (a review found it named
// the mount the link sits on, which the remount does not change).
func TestResumeAfterCacheLostSymlinkedPath(t *testing.T) {
	loopfs.RequireRoot(t)
	lfs := loopfs.Make(t, "ext4", 64)
	data := filepath.Join(lfs.Mount, "data")
	os.Mkdir(data, 0o755)
	link := filepath.Join(t.TempDir(), "data-link")
	if err := os.Symlink(data, link); err != nil {
		t.Fatal(err)
	}
	unix.Sync()
	if a, b := mountID(link), mountID(data); a != b {
		t.Logf("mountID(link) %d, mountID(target) %d", a, b)
	}
	stateDir := filepath.Join(t.TempDir(), "state")
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	first := serveTestSecondary(t, &Server{Link: testLink, StateDir: stateDir,
		Dirs: []Dir{{Name: "data", Path: link}}, Log: quiet, syncfs: func(int) error { return nil }}, data)
	p := first.connect(t, 7)
	p.batch(1, wire.Op{Code: wire.OpCreate, Path: "f", Mode: 0o644}, wire.Op{Code: wire.OpWrite, Path: "f", Data: []byte("batch 1")})
	p.ack(1, 0)
	powerCutAfterAck(t, lfs, first, p)
	again := serveTestSecondary(t, &Server{Link: testLink, StateDir: stateDir,
		Dirs: []Dir{{Name: "data", Path: link}}, Log: quiet}, data)
	p = again.connect(t, 7)
	if p.w.Session != 7 || p.w.Applied < 1 {
		return // not resumed: the primary resyncs
	}
	p.send(&wire.Frame{Type: wire.TypeSync, Seq: 1})
	f, err := p.read()
	if err == nil && f.Type == wire.TypeAck && f.Flags&wire.FlagDurable != 0 {
		if _, serr := os.Lstat(filepath.Join(data, "f")); serr != nil {
			t.Fatalf("welcome resumed session 7 after batch 1 and batch 1 was acknowledged durable (ack %d), but the replica lacks it: %v", f.Seq, serr)
		}
	}
	t.Fatalf("session resumed after a remount (welcome applied %d): the saved progress was kept", p.w.Applied)
}

// TestEntryOverDirtyNameIsSyncfs: `ln p q; rm p; ln -s x p` ships write
// p, link p q, symlink p: the written inode lives on as q only, and the
// Sync must be a syncfs (touch's symlink and mknod branch; a review found
// no test failed without it).
func TestEntryOverDirtyNameIsSyncfs(t *testing.T) {
	for _, made := range []wire.Op{
		{Code: wire.OpSymlink, Path: "p", Path2: "x"},
		{Code: wire.OpMknod, Path: "p", Mode: unix.S_IFIFO | 0o644},
	} {
		a, root, _ := newTestApplier(t)
		if err := os.WriteFile(filepath.Join(root, "p"), nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := a.Sync(); err != nil { // a fresh applier owes a syncfs
			t.Fatal(err)
		}
		ops := []wire.Op{{Code: wire.OpWrite, Path: "p", Data: []byte("acknowledged")}, {Code: wire.OpLink, Path: "p", Path2: "q"}, made}
		for i := range ops {
			if err := a.Apply(&ops[i]); err != nil {
				t.Fatal(err)
			}
		}
		if !a.overflow {
			t.Errorf("%v made over a name written in the window: no syncfs planned, the file written (now q) is flushed by no recorded path", made.Code)
		}
	}
}
