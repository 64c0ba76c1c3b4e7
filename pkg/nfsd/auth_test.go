package nfsd

import (
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/nfsclient"
	"golang.org/x/sys/unix"
)

// dialAs is dialNFS for a client whose calls carry cred.
func dialAs(t testing.TB, addr string, cred nfsclient.Cred) *client {
	c := dialNFS(t, addr)
	c.c.Cred = cred
	return c
}

// needRoot skips a test that needs the server to take on its callers'
// identities, which only root can.
func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: the server acts as each caller with setfsuid/setgroups")
	}
}

// exportTree makes a served directory that every user may search (t.TempDir
// is 0700), with the files of spec made as root and given their owner
// and mode.
func exportTree(t *testing.T, spec []entry) string {
	t.Helper()
	dir := t.TempDir()
	must(t, os.Chmod(dir, 0o755))
	for _, n := range spec {
		p := filepath.Join(dir, n.path)
		switch {
		case n.mode&os.ModeDir != 0:
			must(t, os.Mkdir(p, 0))
		default:
			must(t, os.WriteFile(p, []byte(n.path), 0))
		}
		must(t, os.Chown(p, n.uid, n.gid))
		must(t, os.Chmod(p, n.mode))
	}
	return dir
}

// entry is a file or directory for exportTree.
type entry struct {
	path     string
	uid, gid int
	mode     os.FileMode
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

// owner returns the owner of a file of the export.
func owner(t *testing.T, dir, p string) (uid, gid uint32) {
	t.Helper()
	var st unix.Stat_t
	must(t, unix.Lstat(filepath.Join(dir, p), &st))
	return st.Uid, st.Gid
}

func (c *client) setattr(fh []byte, a nfsclient.SetAttr) uint32 {
	return c.status(func(ctx context.Context) error { return c.c.Setattr(ctx, fh, a) })
}

func ptr(v uint32) *uint32 { return &v }

// TestAuthNoneRefused: an NFS call without an AUTH_SYS credential is
// refused with AUTH_ERROR (AUTH_TOOWEAK for AUTH_NONE, AUTH_BADCRED for
// another flavor or a credential that breaks AUTH_SYS's bounds), and the
// connection serves on; NULL and MOUNT take any credential. Before, go-nfs
// served every call as root whatever it carried.
func TestAuthNoneRefused(t *testing.T) {
	addr, _ := serve(t, t.TempDir(), Fsync{})
	root := dialNFS(t, addr).mount("/")
	getattr := func(xid uint32, cred []byte) []byte {
		return callRecord(xid, progNFS, nfsVersion, 1, cred, xdrOpaque(root))
	}
	gss := append(u32s(6), xdrOpaque(make([]byte, 8))...) // RPCSEC_GSS
	many := make([]uint32, maxGroups+1)
	conn := rawConn(t, addr)
	for _, tc := range []struct {
		name   string
		record []byte
		stat   uint32
	}{
		{"GETATTR with AUTH_NONE", getattr(1, u32s(authNone, 0)), authTooWeak},
		{"GETATTR with RPCSEC_GSS", getattr(2, gss), authBadCred},
		{"GETATTR with 17 groups", getattr(3, authSysCred(0, 0, many...)), authBadCred},
		{"WRITE with AUTH_NONE", callRecord(4, progNFS, nfsVersion, procWrite, u32s(authNone, 0),
			append(xdrOpaque(root), make([]byte, 20)...)), authTooWeak},
	} {
		if _, err := conn.Write(tc.record); err != nil {
			t.Fatal(err)
		}
		body := replyBody(t, conn)
		want := u32s(binary.BigEndian.Uint32(tc.record[4:]), msgReply, msgDenied, authError, tc.stat)
		if string(body) != string(want) {
			t.Errorf("%s: reply %x, want MSG_DENIED AUTH_ERROR %d (%x)", tc.name, body, tc.stat, want)
		}
	}
	for _, tc := range []struct {
		name   string
		record []byte
	}{
		{"NULL with AUTH_NONE", callRecord(5, progNFS, nfsVersion, 0, u32s(authNone, 0), nil)},
		{"MNT with AUTH_NONE", callRecord(6, progMount, mountVersion, 1, u32s(authNone, 0), xdrOpaque([]byte("/")))},
		{"GETATTR with AUTH_SYS", getattr(7, rootCred)},
	} {
		if _, err := conn.Write(tc.record); err != nil {
			t.Fatal(err)
		}
		xid, accept, res := reply(t, conn)
		if want := binary.BigEndian.Uint32(tc.record[4:]); xid != want || accept != 0 || tc.name != "NULL with AUTH_NONE" && binary.BigEndian.Uint32(res) != 0 {
			t.Errorf("%s: XID %d, accept state %d, results %x; want %d, SUCCESS, status OK", tc.name, xid, accept, res, want)
		}
	}
}

// TestOtherVersionsRefused: go-nfs does not look at a call's version, so
// an NFSv4 or NFSv2 call was served as NFSv3 and a MOUNT v1 call as v3,
// past the proxy's checks: a SETATTR with AUTH_NONE set a root-owned
// file's mode, a MNT v1 claiming a 1 GiB path was not bounded. They get
// PROG_MISMATCH (3 to 3) now, and the connection serves on.
func TestOtherVersionsRefused(t *testing.T) {
	dir := t.TempDir()
	addr, _ := serve(t, dir, Fsync{})
	f := newFile(t, dialNFS(t, addr), "f")
	chmod := append(xdrOpaque(f), u32s(1, 0o777, 0, 0, 0, 0, 0, 0)...) // SETATTR mode 0777, no guard
	conn := rawConn(t, addr)
	for _, tc := range []struct {
		name   string
		record []byte
	}{
		{"NFSv4 SETATTR with AUTH_NONE", callRecord(1, progNFS, 4, 2, u32s(authNone, 0), chmod)},
		{"NFSv2 SETATTR with AUTH_NONE", callRecord(2, progNFS, 2, 2, u32s(authNone, 0), chmod)},
		{"MOUNT v1 MNT claiming a 1 GiB path", callRecord(3, progMount, 1, 1, rootCred, u32s(1<<30, 0))},
	} {
		if _, err := conn.Write(tc.record); err != nil {
			t.Fatal(err)
		}
		xid, accept, res := reply(t, conn)
		want := binary.BigEndian.Uint32(tc.record[4:])
		if xid != want || accept != progMismatch || string(res) != string(u32s(3, 3)) {
			t.Errorf("%s: XID %d, accept state %d, %x; want %d, PROG_MISMATCH (%d), versions 3 to 3", tc.name, xid, accept, res, want, progMismatch)
		}
	}
	if fi, err := os.Stat(filepath.Join(dir, "f")); err != nil || fi.Mode().Perm() != 0o644 {
		t.Errorf("f after the refused SETATTRs: %v, %v; want mode 0644", fi.Mode(), err)
	}
	if _, err := conn.Write(rpcCall(9, 1, xdrOpaque(f))); err != nil {
		t.Fatal(err)
	}
	if xid, accept, _ := reply(t, conn); xid != 9 || accept != 0 {
		t.Errorf("GETATTR after them: XID %d, accept state %d; want 9, SUCCESS", xid, accept)
	}
}

// squashed is root on a client, which root squash makes 65534.
var squashed = Squash{Root: true, AnonUID: 65534, AnonGID: 65534}

// TestRootSquash: with root squash, a client's root cannot write, chmod
// or chown a root-owned 0644 file, nor create in a root-owned 0755
// directory, and what it creates where it may belongs to 65534. Without,
// it can. Before, every call acted as the server, root.
func TestRootSquash(t *testing.T) {
	needRoot(t)
	spec := []entry{{"f", 0, 0, 0o644}, {"pub", 0, 0, 0o777 | os.ModeDir}}
	t.Run("squashed", func(t *testing.T) {
		dir := exportTree(t, spec)
		addr, _ := serveSquash(t, dir, Fsync{}, squashed)
		c := dialNFS(t, addr)
		root := c.mount("/")
		f, st := c.lookup(root, "f")
		mustOK(t, "LOOKUP f", st)
		if _, st := c.read(f, 0, 10); st != nfsclient.StatusOK {
			t.Errorf("READ f (0644) as squashed root: status %d, want OK", st)
		}
		for _, stable := range []nfsclient.Stable{nfsclient.Unstable, nfsclient.FileSync} {
			if _, st := c.write(f, 0, []byte("x"), stable); st != nfsclient.StatusAccess {
				t.Errorf("WRITE (stable %d) to root's 0644 f as squashed root: status %d, want ACCES (%d)", stable, st, nfsclient.StatusAccess)
			}
		}
		if st := c.truncate(f, 0); st != nfsclient.StatusAccess {
			t.Errorf("SETATTR size of f as squashed root: status %d, want ACCES (%d)", st, nfsclient.StatusAccess)
		}
		if st := c.setattr(f, nfsclient.SetAttr{UID: ptr(65534)}); st != nfsclient.StatusPerm {
			t.Errorf("SETATTR uid of f as squashed root: status %d, want PERM (%d)", st, nfsclient.StatusPerm)
		}
		if st := c.setattr(f, nfsclient.SetAttr{Mode: ptr(0o666)}); st != nfsclient.StatusPerm {
			t.Errorf("SETATTR mode of f as squashed root: status %d, want PERM (%d)", st, nfsclient.StatusPerm)
		}
		if _, st := c.create(root, "new"); st != nfsclient.StatusAccess {
			t.Errorf("CREATE in root's 0755 directory as squashed root: status %d, want ACCES (%d)", st, nfsclient.StatusAccess)
		}
		if b, _ := os.ReadFile(filepath.Join(dir, "f")); string(b) != "f" {
			t.Errorf("f now holds %q: written as squashed root", b)
		}
		if uid, gid := owner(t, dir, "f"); uid != 0 || gid != 0 {
			t.Errorf("f now owned by %d:%d, want 0:0", uid, gid)
		}
		pub, st := c.lookup(root, "pub")
		mustOK(t, "LOOKUP pub", st)
		_, st = c.create(pub, "mine")
		mustOK(t, "CREATE pub/mine as squashed root", st)
		if uid, gid := owner(t, dir, "pub/mine"); uid != 65534 || gid != 65534 {
			t.Errorf("pub/mine made by squashed root: owned by %d:%d, want 65534:65534", uid, gid)
		}
	})
	t.Run("not squashed", func(t *testing.T) {
		dir := exportTree(t, spec)
		addr, _ := serve(t, dir, Fsync{})
		c := dialNFS(t, addr)
		f, st := c.lookup(c.mount("/"), "f")
		mustOK(t, "LOOKUP f", st)
		_, st = c.write(f, 0, []byte("x"), nfsclient.Unstable)
		mustOK(t, "WRITE f as root", st)
		mustOK(t, "SETATTR uid, gid of f as root", c.setattr(f, nfsclient.SetAttr{UID: ptr(1000), GID: ptr(1000)}))
		if uid, gid := owner(t, dir, "f"); uid != 1000 || gid != 1000 {
			t.Errorf("f after root's chown: owned by %d:%d, want 1000:1000", uid, gid)
		}
	})
}

// TestCallerOwnsNewFiles: a file, directory or symlink a client's user
// makes belongs to that user and group. Before, to root.
func TestCallerOwnsNewFiles(t *testing.T) {
	needRoot(t)
	dir := exportTree(t, []entry{{"home", 1000, 1000, 0o755 | os.ModeDir}})
	addr, _ := serveSquash(t, dir, Fsync{}, squashed)
	c := dialAs(t, addr, nfsclient.Cred{UID: 1000, GID: 1000})
	home, st := c.lookup(c.mount("/"), "home")
	mustOK(t, "LOOKUP home", st)
	_, st = c.create(home, "f")
	mustOK(t, "CREATE home/f", st)
	_, st = c.mkdir(home, "d")
	mustOK(t, "MKDIR home/d", st)
	_, st = c.symlink(home, "s", "f")
	mustOK(t, "SYMLINK home/s", st)
	for _, p := range []string{"home/f", "home/d", "home/s"} {
		if uid, gid := owner(t, dir, p); uid != 1000 || gid != 1000 {
			t.Errorf("%s made by uid 1000: owned by %d:%d, want 1000:1000", p, uid, gid)
		}
	}
}

// TestPermissionDenied: a user's calls are checked against the files'
// owner, group (supplementary groups included) and mode, and a sticky
// directory's, ACCESS and LOOKUP say what the user may do, and a user's
// write clears set-user-ID. Before, every call succeeded as root.
func TestPermissionDenied(t *testing.T) {
	needRoot(t)
	dir := exportTree(t, []entry{
		{"home", 1000, 1000, 0o755 | os.ModeDir},
		{"home/f", 1000, 1000, 0o644},
		{"home/shared", 1000, 3000, 0o660},
		{"home/tool", 1000, 1000, 0o777 | os.ModeSetuid},
		{"private", 1000, 1000, 0o700 | os.ModeDir},
		{"private/p", 1000, 1000, 0o644},
		{"tmp", 0, 0, 0o777 | os.ModeDir | os.ModeSticky},
		{"tmp/hers", 1000, 1000, 0o666},
	})
	addr, _ := serveSquash(t, dir, Fsync{}, squashed)
	other := dialAs(t, addr, nfsclient.Cred{UID: 2000, GID: 2000})
	member := dialAs(t, addr, nfsclient.Cred{UID: 2000, GID: 2000, GIDs: []uint32{2000, 3000}})
	lookup := func(c *client, p ...string) []byte {
		t.Helper()
		fh := c.mount("/")
		for _, name := range p {
			var st uint32
			fh, st = c.lookup(fh, name)
			mustOK(t, "LOOKUP "+name, st)
		}
		return fh
	}
	home, f, shared := lookup(other, "home"), lookup(other, "home", "f"), lookup(other, "home", "shared")

	if got, st := other.read(f, 0, 10); st != nfsclient.StatusOK || string(got) != "home/f" {
		t.Errorf("READ home/f (0644) as another user: status %d, %q", st, got)
	}
	for _, stable := range []nfsclient.Stable{nfsclient.Unstable, nfsclient.FileSync} {
		if _, st := other.write(f, 0, []byte("x"), stable); st != nfsclient.StatusAccess {
			t.Errorf("WRITE (stable %d) to 1000's 0644 home/f as uid 2000: status %d, want ACCES (%d)", stable, st, nfsclient.StatusAccess)
		}
	}
	if st := other.remove(home, "f"); st != nfsclient.StatusAccess {
		t.Errorf("REMOVE home/f (1000's 0755 directory) as uid 2000: status %d, want ACCES (%d)", st, nfsclient.StatusAccess)
	}
	if st := other.rename(home, "f", home, "g"); st != nfsclient.StatusAccess {
		t.Errorf("RENAME home/f as uid 2000: status %d, want ACCES (%d)", st, nfsclient.StatusAccess)
	}
	if _, st := other.create(home, "new"); st != nfsclient.StatusAccess {
		t.Errorf("CREATE in home as uid 2000: status %d, want ACCES (%d)", st, nfsclient.StatusAccess)
	}
	if st := other.setattr(f, nfsclient.SetAttr{Mode: ptr(0o666)}); st != nfsclient.StatusPerm {
		t.Errorf("SETATTR mode of home/f as uid 2000: status %d, want PERM (%d)", st, nfsclient.StatusPerm)
	}
	if _, st := other.write(shared, 0, []byte("x"), nfsclient.Unstable); st != nfsclient.StatusAccess {
		t.Errorf("WRITE to home/shared (group 3000, 0660) as uid 2000 outside group 3000: status %d, want ACCES (%d)", st, nfsclient.StatusAccess)
	}
	if _, st := member.write(shared, 0, []byte("x"), nfsclient.Unstable); st != nfsclient.StatusOK {
		t.Errorf("WRITE to home/shared (group 3000, 0660) as uid 2000 in group 3000: status %d, want OK", st)
	}
	// A write by anyone but root clears set-user-ID, as a local one does.
	if _, st := other.write(lookup(other, "home", "tool"), 0, []byte("x"), nfsclient.FileSync); st != nfsclient.StatusOK {
		t.Errorf("WRITE to home/tool (04777) as uid 2000: status %d, want OK", st)
	}
	if fi, err := os.Stat(filepath.Join(dir, "home", "tool")); err != nil || fi.Mode()&os.ModeSetuid != 0 {
		t.Errorf("home/tool after uid 2000 wrote it: %v, %v; want set-user-ID cleared", fi.Mode(), err)
	}
	if got, st := other.access(f, accessRead|accessModify|accessExtend|accessExecute); st != nfsclient.StatusOK || got != accessRead {
		t.Errorf("ACCESS home/f as uid 2000: status %d, granted %#x, want READ only (%#x)", st, got, accessRead)
	}
	if got, st := other.access(home, 0x3f); st != nfsclient.StatusOK || got != accessRead|accessLookup|accessExecute {
		t.Errorf("ACCESS home as uid 2000: status %d, granted %#x, want READ, LOOKUP, EXECUTE (%#x)", st, got, accessRead|accessLookup|accessExecute)
	}
	if _, st := other.lookup(lookup(other, "private"), "p"); st != nfsclient.StatusAccess {
		t.Errorf("LOOKUP in 1000's 0700 private as uid 2000: status %d, want ACCES (%d)", st, nfsclient.StatusAccess)
	}

	// The sticky directory: only the file's owner (or the directory's)
	// removes it. The kernel says EPERM, answered PERM as knfsd does.
	tmp := lookup(other, "tmp")
	if st := other.remove(tmp, "hers"); st != nfsclient.StatusPerm {
		t.Errorf("REMOVE tmp/hers (1000's, sticky 0777 tmp) as uid 2000: status %d, want PERM (%d)", st, nfsclient.StatusPerm)
	}
	if st := other.rename(tmp, "hers", tmp, "mine"); st != nfsclient.StatusPerm {
		t.Errorf("RENAME tmp/hers as uid 2000: status %d, want PERM (%d)", st, nfsclient.StatusPerm)
	}
	user := dialAs(t, addr, nfsclient.Cred{UID: 1000, GID: 1000})
	if st := user.remove(tmp, "hers"); st != nfsclient.StatusOK {
		t.Errorf("REMOVE tmp/hers as its owner: status %d, want OK", st)
	}
	if _, err := os.Lstat(filepath.Join(dir, "home", "f")); err != nil {
		t.Errorf("home/f after the refused calls: %v", err)
	}
}

// TestCallersTakeTurns sends, on one connection and without waiting for
// replies, FILE_SYNC WRITEs (go-nfs's) of two users in turn to a file
// only one of them may write: each acts as its own caller, though go-nfs
// has one caller per connection at a time. Before, all were root's.
func TestCallersTakeTurns(t *testing.T) {
	needRoot(t)
	dir := exportTree(t, []entry{{"f", 1000, 1000, 0o644}})
	addr, _ := serveSquash(t, dir, Fsync{}, squashed)
	c := dialNFS(t, addr)
	f, st := c.lookup(c.mount("/"), "f")
	mustOK(t, "LOOKUP f", st)
	uids := []uint32{2000, 1000, 2000, 2000, 1000, 1000, 2000, 1000}
	var calls []byte
	for i, uid := range uids {
		args := encodeWrite(f, uint64(i), uint32(nfsclient.FileSync), []byte("x"))
		calls = append(calls, callRecord(uint32(i), progNFS, nfsVersion, procWrite, authSysCred(uid, uid), args)...)
	}
	conn := rawConn(t, addr)
	if _, err := conn.Write(calls); err != nil {
		t.Fatal(err)
	}
	for range uids {
		xid, accept, res := reply(t, conn)
		if int(xid) >= len(uids) || accept != 0 {
			t.Fatalf("reply to XID %d, accept state %d", xid, accept)
		}
		want := uint32(nfsclient.StatusOK)
		if uids[xid] != 1000 {
			want = nfsclient.StatusAccess
		}
		if got := binary.BigEndian.Uint32(res); got != want {
			t.Errorf("WRITE %d as uid %d: status %d, want %d", xid, uids[xid], got, want)
		}
	}
}

func TestParseAuthSys(t *testing.T) {
	body := func(cred []byte) []byte { return cred[8:] } // past flavor and length
	for _, tc := range []struct {
		name string
		body []byte
		want *cred
	}{
		{"root", body(authSysCred(0, 0)), &cred{}},
		{"user with groups", body(authSysCred(1000, 100, 100, 3000)), &cred{uid: 1000, gid: 100, gids: []uint32{100, 3000}}},
		{"16 groups", body(authSysCred(1, 1, make([]uint32, 16)...)), &cred{uid: 1, gid: 1, gids: make([]uint32, 16)}},
		{"17 groups", body(authSysCred(1, 1, make([]uint32, 17)...)), nil},
		{"cut short", body(authSysCred(1000, 100, 100))[:20], nil},
		{"a 256-byte machine name", append(append(u32s(0), xdrOpaque(make([]byte, 256))...), u32s(0, 0, 0)...), nil},
	} {
		got, err := parseAuthSys(tc.body)
		if tc.want == nil {
			if err == nil {
				t.Errorf("%s: %+v, want an error", tc.name, got)
			}
			continue
		}
		if err != nil || !got.equal(tc.want) {
			t.Errorf("%s: %+v, %v; want %+v", tc.name, got, err, tc.want)
		}
	}
}

func TestSquash(t *testing.T) {
	on := Squash{Root: true, AnonUID: 65534, AnonGID: 65533}
	for _, tc := range []struct {
		name    string
		sq      Squash
		in, out cred
	}{
		{"root squashed", on, cred{0, 0, []uint32{0, 5}}, cred{65534, 65533, []uint32{65533, 5}}},
		{"root in a user's group", on, cred{0, 100, nil}, cred{65534, 100, nil}},
		{"a user in group 0", on, cred{1000, 0, []uint32{0}}, cred{1000, 65533, []uint32{65533}}},
		{"a user", on, cred{1000, 100, []uint32{100}}, cred{1000, 100, []uint32{100}}},
		{"root, no squash", Squash{}, cred{0, 0, []uint32{0}}, cred{0, 0, []uint32{0}}},
	} {
		in := tc.in
		if got := tc.sq.apply(&in); !got.equal(&tc.out) {
			t.Errorf("%s: %+v, want %+v", tc.name, *got, tc.out)
		}
	}
}

func TestAccessGranted(t *testing.T) {
	all := uint32(0x3f)
	for _, tc := range []struct {
		name  string
		dir   bool
		modes uint32 // the access(2) bits the caller has
		want  uint32
	}{
		{"file rw-", false, unix.R_OK | unix.W_OK, accessRead | accessModify | accessExtend},
		{"file r-x", false, unix.R_OK | unix.X_OK, accessRead | accessExecute},
		{"dir rwx", true, unix.R_OK | unix.W_OK | unix.X_OK, all},
		{"dir r-x", true, unix.R_OK | unix.X_OK, accessRead | accessLookup | accessExecute},
		{"dir -w- (no search: no change)", true, unix.W_OK, 0},
	} {
		got := accessGranted(tc.dir, all, func(mode uint32) bool { return mode&^tc.modes == 0 })
		if got != tc.want {
			t.Errorf("%s: %#x, want %#x", tc.name, got, tc.want)
		}
	}
	if got := accessGranted(true, accessRead, func(uint32) bool { return true }); got != accessRead {
		t.Errorf("only READ asked: %#x granted", got)
	}
}

// TestUnprivilegedPortRefused: a call from an unprivileged source port
// (1024 and above, which any user of the client host may bind) carries a
// credential any such user forges: it is refused with AUTH_TOOWEAK, as
// knfsd's default `secure` export option does (a review, forty-second
// session, had a process of another user claim uid 1000 and write in uid
// 1000's private directory). NULL, the health check's, is answered;
// Squash.Insecure (--insecure) takes every port.
func TestUnprivilegedPortRefused(t *testing.T) {
	dir := t.TempDir()
	plain := func(addr string) net.Conn {
		conn, err := net.Dial("tcp", addr)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		if port := conn.LocalAddr().(*net.TCPAddr).Port; port < 1024 {
			t.Fatalf("the test's plain dial got privileged port %d", port)
		}
		return conn
	}
	mnt := callRecord(1, progMount, mountVersion, 1, rootCred, xdrOpaque([]byte("/")))
	null := callRecord(2, progNFS, nfsVersion, 0, u32s(authNone, 0), nil)

	addr, stop := serve(t, dir, Fsync{})
	conn := plain(addr)
	for _, rec := range [][]byte{mnt, callRecord(3, progNFS, nfsVersion, 1, rootCred, xdrOpaque(make([]byte, 8)))} {
		if _, err := conn.Write(rec); err != nil {
			t.Fatal(err)
		}
		body := replyBody(t, conn)
		if want := u32s(binary.BigEndian.Uint32(rec[4:]), msgReply, msgDenied, authError, authTooWeak); string(body) != string(want) {
			t.Errorf("proc %d from an unprivileged port: reply %x, want MSG_DENIED AUTH_ERROR AUTH_TOOWEAK", binary.BigEndian.Uint32(rec[24:]), body)
		}
	}
	if _, err := conn.Write(null); err != nil {
		t.Fatal(err)
	}
	if xid, accept, _ := reply(t, conn); xid != 2 || accept != 0 {
		t.Errorf("NULL from an unprivileged port: XID %d accept %d, want answered", xid, accept)
	}
	// From a privileged port, MNT is answered.
	if dialNFS(t, addr).mount("/") == nil {
		t.Fatal("no root handle")
	}
	stop()

	addr, _ = serveSquash(t, dir, Fsync{}, Squash{Insecure: true})
	conn = plain(addr)
	if _, err := conn.Write(mnt); err != nil {
		t.Fatal(err)
	}
	if xid, accept, res := reply(t, conn); xid != 1 || accept != 0 || binary.BigEndian.Uint32(res) != 0 {
		t.Errorf("MNT from an unprivileged port with Insecure: XID %d accept %d results %x, want MNT3_OK", xid, accept, res)
	}
}

// TestUnprivilegedPortRefusedOverIPv6: the port check holds for IPv6
// clients and for IPv4 ones on a dual-stack listener (IPv4-mapped
// addresses), from a review.
func TestUnprivilegedPortRefusedOverIPv6(t *testing.T) {
	dir := t.TempDir()
	for _, la := range []string{"[::1]:0", "[::]:0"} {
		l, err := net.Listen("tcp", la)
		if err != nil {
			t.Skipf("no IPv6 listener here: %v", err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- Serve(ctx, l, dir, Fsync{}, Squash{}) }()
		port := strconv.Itoa(l.Addr().(*net.TCPAddr).Port)
		target := net.JoinHostPort("::1", port)
		if la == "[::]:0" {
			target = net.JoinHostPort("127.0.0.1", port) // IPv4-mapped on a dual-stack socket
		}
		conn, err := net.Dial("tcp", target)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := conn.Write(callRecord(1, progMount, mountVersion, 1, rootCred, xdrOpaque([]byte("/")))); err != nil {
			t.Fatal(err)
		}
		if body := replyBody(t, conn); string(body) != string(u32s(1, msgReply, msgDenied, authError, authTooWeak)) {
			t.Errorf("MNT on %s from %v: reply %x, want MSG_DENIED AUTH_ERROR AUTH_TOOWEAK", la, conn.LocalAddr(), body)
		}
		conn.Close()
		cancel()
		<-done
	}
}

// TestUnprivilegedPortRefusedThroughAllowListener: the port check sees
// the client's TCP address through AllowListener (nfs-serve's listener).
func TestUnprivilegedPortRefusedThroughAllowListener(t *testing.T) {
	dir := t.TempDir()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- Serve(ctx, &AllowListener{Listener: l, Allow: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}}, dir, Fsync{}, Squash{})
	}()
	defer func() { cancel(); <-done }()
	conn, err := net.Dial("tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(callTimeout))
	if _, err := conn.Write(callRecord(1, progMount, mountVersion, 1, rootCred, xdrOpaque([]byte("/")))); err != nil {
		t.Fatal(err)
	}
	if body := replyBody(t, conn); string(body) != string(u32s(1, msgReply, msgDenied, authError, authTooWeak)) {
		t.Errorf("MNT through AllowListener from %v: reply %x, want AUTH_TOOWEAK", conn.LocalAddr(), body)
	}
}
