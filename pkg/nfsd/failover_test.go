package nfsd

import (
	"bytes"
	"context"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/nfsclient"
)

// countingSyncer records which files were synced, relative to the export.
type countingSyncer struct {
	mu     sync.Mutex
	synced map[string]int
}

func (s *countingSyncer) Sync(f *os.File) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.synced == nil {
		s.synced = map[string]int{}
	}
	s.synced[f.Name()]++
	return f.Sync()
}

func (s *countingSyncer) count(name string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.synced[name]
}

// serve runs Serve on dir at a loopback port until stop is called, with
// clients' root acting as root.
func serve(t testing.TB, dir string, s Syncer) (addr string, stop func()) {
	t.Helper()
	return serveSquash(t, dir, s, Squash{})
}

// serveSquash is serve with root squash sq.
func serveSquash(t testing.TB, dir string, s Syncer, sq Squash) (addr string, stop func()) {
	t.Helper()
	return serveWith(t, dir, func(ctx context.Context, l net.Listener) error { return Serve(ctx, l, dir, s, sq) })
}

// serveWith is serve with run as Serve.
func serveWith(t testing.TB, dir string, run func(ctx context.Context, l net.Listener) error) (addr string, stop func()) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- run(ctx, l) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Serve %s: %v", dir, err)
				}
			case <-time.After(10 * time.Second):
				t.Errorf("Serve %s: did not return 10 s after its context ended", dir)
			}
		})
	}
	t.Cleanup(stop)
	return l.Addr().String(), stop
}

// copyTree copies src to dst as a file-level replica does: same paths,
// contents, modes and symlinks (the index included), other inode numbers.
func copyTree(t *testing.T, src, dst string) {
	t.Helper()
	err := filepath.WalkDir(src, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		to := filepath.Join(dst, rel)
		info, err := d.Info()
		if err != nil {
			return err
		}
		switch {
		case d.IsDir():
			return os.MkdirAll(to, info.Mode().Perm())
		case info.Mode()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			return os.Symlink(target, to)
		default:
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			return os.WriteFile(to, b, info.Mode().Perm())
		}
	})
	if err != nil {
		t.Fatalf("copying %s to %s: %v", src, dst, err)
	}
}

func inode(t *testing.T, p string) uint64 {
	t.Helper()
	fi, err := os.Lstat(p)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

// held is a handle a client keeps across servers, with what it expects.
type held struct {
	name    string
	fh      []byte
	fileid  uint64
	content string // for regular files
}

// check asserts that every handle resolves on the server c talks to, with
// the same fileid and the expected content: no ESTALE, nothing else.
func check(t *testing.T, c *client, server string, hs []*held) {
	t.Helper()
	for _, h := range hs {
		a, st := c.getattr(h.fh)
		if st != nfsclient.StatusOK {
			t.Errorf("%s: GETATTR %s with the handle kept from before: status %d, want OK", server, h.name, st)
			continue
		}
		if a.Fileid != h.fileid {
			t.Errorf("%s: %s fileid %#x, was %#x (a Linux client sees ESTALE)", server, h.name, a.Fileid, h.fileid)
		}
		switch a.Type {
		case nfsclient.TypeReg:
			got, st := c.read(h.fh, 0, 1<<20)
			if st != nfsclient.StatusOK || string(got) != h.content {
				t.Errorf("%s: READ %s: status %d, %q, want %q", server, h.name, st, got, h.content)
			}
		case nfsclient.TypeLnk:
			got, st := c.readlink(h.fh)
			if st != nfsclient.StatusOK || got != h.content {
				t.Errorf("%s: READLINK %s: status %d, %q, want %q", server, h.name, st, got, h.content)
			}
		}
	}
}

func mustOK(t testing.TB, what string, st uint32) {
	t.Helper()
	if st != nfsclient.StatusOK {
		t.Fatalf("%s: status %d", what, st)
	}
}

// TestHandlesSurviveFailover keeps a client's handles across a failover,
// a second move and a failback, each to a copy of the tree with other
// inode numbers, and uses them without a new mount or lookup. The client
// is the same throughout: its connection breaks when a server stops, and
// it redials where the service went, as behind a VIP.
func TestHandlesSurviveFailover(t *testing.T) {
	a := t.TempDir()
	// Made before the server first ran: IDs come at the first lookup.
	os.MkdirAll(filepath.Join(a, "pre"), 0o755)
	os.WriteFile(filepath.Join(a, "pre", "old.txt"), []byte("old"), 0o644)

	syncer := &countingSyncer{}
	addr, stop := serve(t, a, syncer)
	c := dialNFS(t, addr)
	root := c.mount("/")
	attrOf := func(name string, fh []byte, content string) *held {
		t.Helper()
		at, st := c.getattr(fh)
		mustOK(t, "GETATTR "+name, st)
		return &held{name: name, fh: fh, fileid: at.Fileid, content: content}
	}
	pre, st := c.lookup(root, "pre")
	mustOK(t, "LOOKUP pre", st)
	old, st := c.lookup(pre, "old.txt")
	mustOK(t, "LOOKUP old.txt", st)
	d, st := c.mkdir(root, "d")
	mustOK(t, "MKDIR d", st)
	f, st := c.create(d, "f")
	mustOK(t, "CREATE d/f", st)
	level, st := c.write(f, 0, []byte("hello "), nfsclient.Unstable)
	mustOK(t, "WRITE d/f", st)
	if level != nfsclient.Unstable {
		t.Fatalf("WRITE UNSTABLE answered stability %d, want UNSTABLE", level)
	}
	_, st = c.write(f, 6, []byte("world"), nfsclient.Unstable)
	mustOK(t, "WRITE d/f", st)
	mustOK(t, "COMMIT d/f", c.commit(f))
	if n := syncer.count("d/f"); n < 2 {
		t.Fatalf("d/f synced %d times after CREATE and COMMIT, want 2", n)
	}
	g, st := c.create(root, "g")
	mustOK(t, "CREATE g", st)
	_, st = c.write(g, 0, []byte("G"), nfsclient.FileSync)
	mustOK(t, "WRITE g", st)
	mustOK(t, "RENAME g d/g2", c.rename(root, "g", d, "g2"))
	x, st := c.create(root, "x")
	mustOK(t, "CREATE x", st)
	mustOK(t, "REMOVE x", c.remove(root, "x"))
	mustOK(t, "RENAME d e", c.rename(root, "d", root, "e"))
	s, st := c.symlink(root, "s", "e/f")
	mustOK(t, "SYMLINK s", st)
	hs := []*held{attrOf("/", root, ""), attrOf("pre", pre, ""), attrOf("pre/old.txt", old, "old"),
		attrOf("e", d, ""), attrOf("e/f", f, "hello world"), attrOf("e/g2", g, "G"), attrOf("s", s, "e/f")}
	check(t, c, "first server", hs)
	stop()

	// Failover: the peer's copy, other inode numbers.
	b := t.TempDir()
	copyTree(t, a, b)
	if inode(t, filepath.Join(a, "e", "f")) == inode(t, filepath.Join(b, "e", "f")) {
		t.Fatal("the copy kept the inode number: the test would prove nothing")
	}
	addr, stop = serve(t, b, Fsync{})
	c.point(addr)
	check(t, c, "after failover", hs)
	if st := func() uint32 { _, st := c.getattr(x); return st }(); st != nfsclient.StatusStale {
		t.Errorf("after failover: GETATTR of the removed x: status %d, want STALE", st)
	}
	if got := c.mount("/"); !bytes.Equal(got, root) {
		t.Errorf("after failover: root handle %x, was %x", got, root)
	}
	mustOK(t, "FSSTAT after failover", c.fsstat(root))
	// A volume is a subdirectory mounted on its own.
	if got := c.mount("/pre"); !bytes.Equal(got, pre) {
		t.Errorf("after failover: MOUNT /pre gives %x, LOOKUP gave %x", got, pre)
	}
	_, st = c.write(f, 11, []byte("!"), nfsclient.FileSync)
	mustOK(t, "WRITE e/f after failover", st)
	mustOK(t, "COMMIT e/f after failover", c.commit(f))
	hs[4].content = "hello world!"
	ents, st := c.readdirplus(d)
	mustOK(t, "READDIRPLUS e", st)
	want := map[string][]byte{"f": f, "g2": g}
	for _, e := range ents {
		if !bytes.Equal(e.Handle, want[e.Name]) {
			t.Errorf("after failover: READDIRPLUS e: %s handle %x, want %x", e.Name, e.Handle, want[e.Name])
		}
		delete(want, e.Name)
	}
	if len(want) != 0 {
		var got []string
		for _, e := range ents {
			got = append(got, e.Name)
		}
		t.Errorf("after failover: READDIRPLUS e: missing %v (got %v)", want, got)
	}
	if fh, st := c.lookup(pre, "old.txt"); st != nfsclient.StatusOK || !bytes.Equal(fh, old) {
		t.Errorf("after failover: LOOKUP old.txt: status %d, handle %x, want %x", st, fh, old)
	}
	n, st := c.create(d, "new")
	mustOK(t, "CREATE e/new after failover", st)
	_, st = c.write(n, 0, []byte("made on b"), nfsclient.Unstable)
	mustOK(t, "WRITE e/new", st)
	mustOK(t, "SETATTR size of e/new", c.truncate(n, 4))
	hs = append(hs, attrOf("e/new", n, "made"))
	// Root on a 0644 file: READ, MODIFY, EXTEND; no EXECUTE, and LOOKUP
	// and DELETE are a directory's.
	if got, st := c.access(f, 0x3f); st != nfsclient.StatusOK || got != 0x0d {
		t.Errorf("after failover: ACCESS e/f: status %d, granted %#x of 0x3f, want 0xd", st, got)
	}
	check(t, c, "after failover", hs)
	stop()

	// Failback: the old primary, resynced, serves again.
	back := t.TempDir()
	copyTree(t, b, back)
	addr, stop = serve(t, back, Fsync{})
	c.point(addr)
	check(t, c, "after failback", hs)
	ents, st = c.readdirplus(root)
	mustOK(t, "READDIRPLUS /", st)
	for _, e := range ents {
		if strings.HasPrefix(e.Name, ".duet") {
			t.Errorf("after failback: READDIRPLUS / shows the index directory %s", e.Name)
		}
	}
	stop()
}
