package nfsd

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/loopfs"
	"github.com/duet-ha/duet/pkg/nfsclient"
	nfs "github.com/willscott/go-nfs"
	"golang.org/x/sys/unix"
)

// From a review of the refined statuses (forty-fourth session); each
// failed on the code before its fix.

// TestRefinedStatusIsTheCallsOwn: a call passed with refine (RMDIR of a
// non-empty directory, which go-nfs answers IO, refined to NOTEMPTY) is
// followed on the same connection by a FILE_SYNC WRITE. A stable WRITE
// went through serveCall -> passAs without waitIdle, so go-nfs ran it as
// soon as it had handed the RMDIR's reply to its writer goroutine, and
// the WRITE's failure (ENOSPC on a full filesystem) landed in
// proxy.failed before serveReplies refined the RMDIR's reply: the RMDIR
// was answered NOSPC (16 to 26 rounds in 300).
func TestRefinedStatusIsTheCallsOwn(t *testing.T) {
	dir := t.TempDir()
	loopfs.Tmpfs(t, dir) // 1 MiB
	addr, _ := serve(t, dir, Fsync{})
	c := dialNFS(t, addr)
	root := c.mount("/")
	b, st := c.mkdir(root, "b")
	mustOK(t, "MKDIR b", st)
	_, st = c.create(b, "f")
	mustOK(t, "CREATE b/f", st)
	f, st := c.create(root, "big")
	mustOK(t, "CREATE big", st)
	fill(t, c, f)

	conn := rawConn(t, addr)
	wrong := map[uint32]int{}
	const rounds = 300
	for i := range uint32(rounds) {
		rmdir := rpcCall(1000+2*i, procRmdir, dirop(root, "b"))
		write := writeCall(1001+2*i, f, 8<<20, 2 /* FILE_SYNC */, make([]byte, 4096))
		if _, err := conn.Write(append(rmdir, write...)); err != nil {
			t.Fatal(err)
		}
		for range 2 {
			body := replyBody(t, conn)
			xid, st := replyStatus(body)
			if xid == 1000+2*i && st != uint32(nfs.NFSStatusNotEmpty) {
				wrong[st]++
			}
		}
	}
	if len(wrong) > 0 {
		t.Errorf("RMDIR of a non-empty directory pipelined with a failing FILE_SYNC WRITE, %d rounds: statuses other than NOTEMPTY (%d): %v (NOSPC is %d)",
			rounds, nfs.NFSStatusNotEmpty, wrong, nfs.NFSStatusNoSPC)
	}
}

// TestRefinedAccesStaysAcces: uid 1000's CREATE in a directory it may
// not write (EACCES: go-nfs's ACCES, which refine must leave) is
// pipelined with uid 1000's FILE_SYNC WRITE that fails ENOSPC: the
// CREATE was answered NOSPC, a permission error turned into "no space".
func TestRefinedAccesStaysAcces(t *testing.T) {
	dir := t.TempDir()
	loopfs.Tmpfs(t, dir) // 1 MiB
	addr, _ := serve(t, dir, Fsync{})
	c := dialNFS(t, addr)
	root := c.mount("/")
	mustOK(t, "SETATTR / 0777", c.setattr(root, nfsclient.SetAttr{Mode: ptr(0o777)}))
	ro, st := c.mkdir(root, "ro")
	mustOK(t, "MKDIR ro", st)
	mustOK(t, "SETATTR ro 0555", c.setattr(ro, nfsclient.SetAttr{Mode: ptr(0o555)}))
	user := dialAs(t, addr, nfsclient.Cred{UID: 1000, GID: 1000})
	f, st := user.create(root, "big")
	mustOK(t, "CREATE big", st)
	fill(t, user, f)
	cred := authSysCred(1000, 1000)
	conn := rawConn(t, addr)
	wrong := map[uint32]int{}
	const rounds = 300
	for i := range uint32(rounds) {
		create := callRecord(1000+2*i, progNFS, nfsVersion, procCreate, cred, append(dirop(ro, "x"), append(u32s(0), sattr(nil, nil)...)...))
		write := callRecord(1001+2*i, progNFS, nfsVersion, procWrite, cred, encodeWrite(f, 8<<20, 2, make([]byte, 4096)))
		if _, err := conn.Write(append(create, write...)); err != nil {
			t.Fatal(err)
		}
		for range 2 {
			xid, st := replyStatus(replyBody(t, conn))
			if xid == 1000+2*i && st != uint32(nfs.NFSStatusAccess) {
				wrong[st]++
			}
		}
	}
	if len(wrong) > 0 {
		t.Errorf("CREATE in a directory the caller may not write, pipelined with a failing FILE_SYNC WRITE, %d rounds: statuses other than ACCES (%d): %v (NOSPC is %d)",
			rounds, nfs.NFSStatusAccess, wrong, nfs.NFSStatusNoSPC)
	}
}

// failDirSyncer fails the sync of every directory once armed: the disk
// under the export fails.
type failDirSyncer struct{ armed atomic.Bool }

func (s *failDirSyncer) Sync(f *os.File) error {
	if s.armed.Load() {
		if fi, err := f.Stat(); err == nil && fi.IsDir() {
			return unix.EIO
		}
	}
	return f.Sync()
}

// TestFailedSyncOfNewEntryIsIO: a MKDIR, CREATE or SYMLINK whose
// directory sync fails (newEntry: the entry is made but not durable) kept
// go-nfs's ACCES: the client said "Permission denied" for a failing disk.
// A change that is not durable is answered IO.
func TestFailedSyncOfNewEntryIsIO(t *testing.T) {
	dir := t.TempDir()
	s := &failDirSyncer{}
	addr, _ := serve(t, dir, s)
	c := dialNFS(t, addr)
	root := c.mount("/")
	s.armed.Store(true)
	_, mk := c.mkdir(root, "d")
	_, cr := c.create(root, "f")
	_, sl := c.symlink(root, "l", "target")
	for _, tc := range []struct {
		name string
		st   uint32
	}{{"MKDIR", mk}, {"CREATE", cr}, {"SYMLINK", sl}} {
		if tc.st != nfsIO {
			t.Errorf("%s whose directory sync failed: status %d, want IO (%d)", tc.name, tc.st, nfsIO)
		}
	}
}

// TestRmdirWithoutPermissionIsAcces: RMDIR of a non-empty directory in a
// directory the caller may not write. Linux checks the permission first
// (rmdir(2): EACCES); Remove checked emptiness as the server first, so
// the caller was answered NOTEMPTY (IO before d7ea059), and learned
// whether a directory it may neither change nor read is empty.
func TestRmdirWithoutPermissionIsAcces(t *testing.T) {
	dir := t.TempDir()
	addr, _ := serve(t, dir, Fsync{})
	c := dialNFS(t, addr)
	root := c.mount("/")
	p, st := c.mkdir(root, "p")
	mustOK(t, "MKDIR p", st)
	q, st := c.mkdir(p, "q")
	mustOK(t, "MKDIR p/q", st)
	_, st = c.create(q, "f")
	mustOK(t, "CREATE p/q/f", st)
	mustOK(t, "SETATTR p/q 0700", c.setattr(q, nfsclient.SetAttr{Mode: ptr(0o700)}))
	mustOK(t, "SETATTR p 0755", c.setattr(p, nfsclient.SetAttr{Mode: ptr(0o755)}))
	user := dialAs(t, addr, nfsclient.Cred{UID: 1000, GID: 1000})
	if st := user.status(func(ctx context.Context) error { return user.c.Rmdir(ctx, p, "q") }); st != uint32(nfs.NFSStatusAccess) {
		t.Errorf("uid 1000's RMDIR of root's non-empty p/q in root's 0755 p: status %d, want ACCES (%d) as rmdir(2)", st, nfs.NFSStatusAccess)
	}
}

// TestRmdirStickyDoesNotLeakEmptiness: in a sticky directory (0o1777, as
// /tmp) uid 1000 may write the parent, so a first fix's faccessat check
// passed, but rmdir(2) refuses it (EPERM, check_sticky in may_delete)
// before the filesystem looks at emptiness: uid 1001's 0700 directories
// must not be reported NOTEMPTY to uid 1000 when they have entries and
// ACCES/PERM when they have none (a second review).
func TestRmdirStickyDoesNotLeakEmptiness(t *testing.T) {
	dir := t.TempDir()
	addr, _ := serve(t, dir, Fsync{})
	c := dialNFS(t, addr)
	root := c.mount("/")
	s, st := c.mkdir(root, "sticky")
	mustOK(t, "MKDIR sticky", st)
	// go-nfs's SETATTR keeps only the permission bits: set the sticky bit
	// on the export's directory itself, as an administrator would.
	if err := os.Chmod(filepath.Join(dir, "sticky"), 0o777|os.ModeSticky); err != nil {
		t.Fatal(err)
	}
	othersDirs(t, addr, s)
	stFull, stEmpty := rmdirBoth(t, addr, s)
	t.Logf("uid 1000 RMDIR of uid 1001's 0700 dirs in a 1777 dir: non-empty -> %d, empty -> %d (ACCES %d, PERM %d, NOTEMPTY %d)",
		stFull, stEmpty, nfs.NFSStatusAccess, nfs.NFSStatusPerm, nfs.NFSStatusNotEmpty)
	if stFull != stEmpty {
		t.Errorf("statuses differ by the emptiness of a directory uid 1000 may not read: non-empty %d, empty %d", stFull, stEmpty)
	}
	if stFull == uint32(nfs.NFSStatusNotEmpty) {
		t.Errorf("non-empty: NOTEMPTY, want ACCES or PERM as rmdir(2)'s EPERM")
	}
}

// TestRmdirImmutableParentDoesNotLeakEmptiness: faccessat2 answers EPERM
// for W_OK on an immutable directory; x/sys/unix.Faccessat took EPERM
// for "faccessat2 not allowed" and emulated the check with the process's
// euid (0): it passed, and the server's emptiness check answered.
// rmdir(2) says EPERM whatever the directory holds (a second review).
func TestRmdirImmutableParentDoesNotLeakEmptiness(t *testing.T) {
	dir := t.TempDir()
	addr, _ := serve(t, dir, Fsync{})
	c := dialNFS(t, addr)
	root := c.mount("/")
	p, st := c.mkdir(root, "p")
	mustOK(t, "MKDIR p", st)
	mustOK(t, "SETATTR p 0777", c.setattr(p, nfsclient.SetAttr{Mode: ptr(0o777)}))
	othersDirs(t, addr, p)
	pp := filepath.Join(dir, "p")
	if out, err := exec.Command("chattr", "+i", pp).CombinedOutput(); err != nil {
		t.Skipf("chattr +i: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("chattr", "-i", pp).Run() })
	stFull, stEmpty := rmdirBoth(t, addr, p)
	t.Logf("uid 1000 RMDIR in an immutable 0777 dir: non-empty -> %d, empty -> %d", stFull, stEmpty)
	if stFull != stEmpty {
		t.Errorf("statuses differ by the emptiness of a directory uid 1000 may not read: non-empty %d, empty %d", stFull, stEmpty)
	}
}

// TestPipelinedChangesBehindUnreadReads: a client sends 16 READs of 1 MiB,
// then a FILE_SYNC WRITE, a CREATE and a SETATTR, all before reading a
// reply. The changes now wait (waitIdle) until every earlier reply is
// written to the client; the client reads only after it has sent
// everything: no deadlock must follow.
func TestPipelinedChangesBehindUnreadReads(t *testing.T) {
	dir := t.TempDir()
	addr, _ := serve(t, dir, Fsync{})
	c := dialNFS(t, addr)
	root := c.mount("/")
	f, st := c.create(root, "f")
	mustOK(t, "CREATE f", st)
	mustOK(t, "WRITE f", c.status(func(ctx context.Context) error {
		_, err := c.c.Write(ctx, f, 0, make([]byte, 1<<20), nfsclient.FileSync)
		return err
	}))
	conn := rawConn(t, addr)
	var out []byte
	for i := range uint32(16) {
		out = append(out, readCall(100+i, f, 0, 1<<20)...)
	}
	out = append(out, writeCall(200, f, 0, 2, make([]byte, 4096))...)
	out = append(out, rpcCall(201, procCreate, append(dirop(root, "g"), append(u32s(0), sattr(nil, nil)...)...))...)
	start := time.Now()
	if _, err := conn.Write(out); err != nil {
		t.Fatal(err)
	}
	t.Logf("all %d bytes of calls sent in %v", len(out), time.Since(start))
	for range 18 {
		body := replyBody(t, conn)
		xid, st := replyStatus(body)
		if xid >= 200 && st != 0 {
			t.Errorf("XID %d: status %d", xid, st)
		}
	}
	t.Logf("18 replies read after %v", time.Since(start))
}

// othersDirs makes, as uid 1001, two 0700 directories in dir: "full",
// which holds a file, and "empty".
func othersDirs(t *testing.T, addr string, dir []byte) {
	t.Helper()
	other := dialAs(t, addr, nfsclient.Cred{UID: 1001, GID: 1001})
	full, st := other.mkdir(dir, "full")
	mustOK(t, "MKDIR full as 1001", st)
	_, st = other.create(full, "f")
	mustOK(t, "CREATE full/f as 1001", st)
	mustOK(t, "SETATTR full 0700", other.setattr(full, nfsclient.SetAttr{Mode: ptr(0o700)}))
	emp, st := other.mkdir(dir, "empty")
	mustOK(t, "MKDIR empty as 1001", st)
	mustOK(t, "SETATTR empty 0700", other.setattr(emp, nfsclient.SetAttr{Mode: ptr(0o700)}))
}

// rmdirBoth returns the statuses of uid 1000's RMDIR of othersDirs' two
// directories in dir.
func rmdirBoth(t *testing.T, addr string, dir []byte) (full, empty uint32) {
	t.Helper()
	user := dialAs(t, addr, nfsclient.Cred{UID: 1000, GID: 1000})
	full = user.status(func(ctx context.Context) error { return user.c.Rmdir(ctx, dir, "full") })
	empty = user.status(func(ctx context.Context) error { return user.c.Rmdir(ctx, dir, "empty") })
	return full, empty
}
