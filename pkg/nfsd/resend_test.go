package nfsd

import (
	"bytes"
	"context"
	"encoding/binary"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/nfsclient"
)

// sattr encodes a sattr3 that sets the mode and the size given.
func sattr(mode *uint32, size *uint64) []byte {
	b := u32s(0)
	if mode != nil {
		b = u32s(1, *mode)
	}
	b = append(b, u32s(0, 0)...) // uid, gid
	if size != nil {
		b = binary.BigEndian.AppendUint64(append(b, u32s(1)...), *size)
	} else {
		b = append(b, u32s(0)...)
	}
	return append(b, u32s(0, 0)...) // atime, mtime: unchanged
}

// dirop encodes diropargs3.
func dirop(dir []byte, name string) []byte { return append(xdrOpaque(dir), xdrOpaque([]byte(name))...) }

// truncateArgs encodes SETATTR3args setting fh's size, without a guard.
func truncateArgs(fh []byte, size uint64) []byte {
	return append(append(xdrOpaque(fh), sattr(nil, &size)...), u32s(0)...)
}

// exchange sends record on a new connection to addr and returns the
// reply's body and NFS status.
func exchange(t *testing.T, addr string, record []byte) ([]byte, uint32) {
	t.Helper()
	return exchangeOn(t, rawConn(t, addr), record)
}

func exchangeOn(t *testing.T, conn net.Conn, record []byte) ([]byte, uint32) {
	t.Helper()
	if _, err := conn.Write(record); err != nil {
		t.Fatal(err)
	}
	body := replyBody(t, conn)
	if len(body) < 28 || binary.BigEndian.Uint32(body[20:]) != 0 {
		t.Fatalf("reply %x: not an accepted call with a status", body)
	}
	return body, binary.BigEndian.Uint32(body[24:])
}

// writeCommitted writes data to fh as a client does, UNSTABLE then
// COMMIT, and fails the test unless both succeed.
func writeCommitted(t *testing.T, c *client, fh []byte, data string) {
	t.Helper()
	_, st := c.write(fh, 0, []byte(data), nfsclient.Unstable)
	mustOK(t, "WRITE "+data, st)
	mustOK(t, "COMMIT", c.commit(fh))
}

// holdingSyncer holds the syncs of the file name (every file if ""),
// once armed, until release is closed: a peer that does not answer.
type holdingSyncer struct {
	name    string
	armed   atomic.Bool
	once    sync.Once
	held    chan struct{} // closed when a sync is first held
	release chan struct{}
}

func (s *holdingSyncer) Sync(f *os.File) error {
	if (s.name == "" || f.Name() == s.name) && s.armed.Load() {
		s.once.Do(func() { close(s.held) })
		<-s.release
	}
	return f.Sync()
}

// heldPeer is a server whose peer holds syncs, and which says when a
// resent call waits for its first attempt.
type heldPeer struct {
	addr    string
	syncer  *holdingSyncer
	waiting chan struct{} // closed when a call first waits
	release func()        // the held syncs end
}

// serveHeld serves a new export whose syncs of name (every file if "")
// are held once syncer.armed is set.
func serveHeld(t *testing.T, name string) *heldPeer {
	dir := t.TempDir()
	p := &heldPeer{syncer: &holdingSyncer{name: name, held: make(chan struct{}), release: make(chan struct{})}, waiting: make(chan struct{})}
	h, err := New(dir, p.syncer)
	if err != nil {
		t.Fatal(err)
	}
	var waited, released sync.Once
	h.drc.waiting = func() { waited.Do(func() { close(p.waiting) }) }
	p.release = func() { released.Do(func() { close(p.syncer.release) }) }
	p.addr, _ = serveWith(t, dir, h.serve)
	t.Cleanup(p.release) // before the server stops
	return p
}

// held waits until a sync is held.
func (p *heldPeer) held(t *testing.T, what string) {
	t.Helper()
	select {
	case <-p.syncer.held:
	case <-time.After(callTimeout):
		t.Fatalf("%s: no sync", what)
	}
}

// resend sends record on a new connection to addr; the reply's body
// comes on the channel, nil if none came.
func resend(t *testing.T, addr string, record []byte) <-chan []byte {
	conn := rawConn(t, addr)
	if _, err := conn.Write(record); err != nil {
		t.Fatal(err)
	}
	out := make(chan []byte, 1)
	go func() {
		body, _ := readReply(conn)
		out <- body
	}()
	return out
}

// replyStatus returns a reply's XID and NFS status (noReply if it has
// none).
func replyStatus(body []byte) (xid, st uint32) {
	if len(body) < 28 || binary.BigEndian.Uint32(body[20:]) != 0 {
		return 0, noReply
	}
	return binary.BigEndian.Uint32(body), binary.BigEndian.Uint32(body[24:])
}

// mustAnswer waits for a reply to xid with status OK.
func mustAnswer(t *testing.T, what string, replies <-chan []byte, xid uint32) {
	t.Helper()
	select {
	case body := <-replies:
		if got, st := replyStatus(body); got != xid || st != nfsclient.StatusOK {
			t.Fatalf("%s: reply to XID %d, status %d (%x); want XID %d, OK", what, got, st, body, xid)
		}
	case <-time.After(callTimeout):
		t.Fatalf("%s: no reply", what)
	}
}

// TestResentTruncateWhileFirstRuns: a client's SETATTR of the size waits
// on its connection behind a call whose sync the peer holds; the client
// gives up on it and sends it again on a new connection, gets the reply
// and writes FILE_SYNC. The first attempt, once it runs, must not empty
// the file: the resent call waits for the first attempt and gets its
// reply, so that the client writes after the truncation. Before, the
// resent call ran on its own and the first attempt emptied the file.
// (FILE_SYNC: a COMMIT would wait for the held sync, as it must.)
func TestResentTruncateWhileFirstRuns(t *testing.T) {
	p := serveHeld(t, "g")
	c := dialNFS(t, p.addr)
	f := newFile(t, c, "f")
	g, st := c.create(c.mount("/"), "g")
	mustOK(t, "CREATE g", st)
	p.syncer.armed.Store(true)

	const xid = 77
	truncate := rpcCall(xid, procSetattr, truncateArgs(f, 0))
	first := rawConn(t, p.addr)
	if _, err := first.Write(append(writeCall(1, g, 0, uint32(nfsclient.FileSync), []byte("g")), truncate...)); err != nil {
		t.Fatal(err)
	}
	p.held(t, "the FILE_SYNC WRITE of g")
	again := resend(t, p.addr, truncate)
	// The client writes once the truncate is answered. The peer answers
	// once that is done, or once the resent call waits for the first.
	select {
	case body := <-again:
		if got, st := replyStatus(body); got != xid || st != nfsclient.StatusOK {
			t.Fatalf("the resent SETATTR: reply to XID %d, status %d; want XID %d, OK", got, st, xid)
		}
	case <-p.waiting:
		p.release()
		mustAnswer(t, "the resent SETATTR, once the first attempt could run", again, xid)
	case <-time.After(callTimeout):
		t.Fatal("the resent SETATTR neither answered nor waiting")
	}
	_, st = c.write(f, 0, []byte("data"), nfsclient.FileSync)
	mustOK(t, "WRITE f FILE_SYNC", st)
	p.release()
	for _, want := range []uint32{1, xid} {
		if got, accept, res := reply(t, first); got != want || accept != 0 || binary.BigEndian.Uint32(res) != nfsclient.StatusOK {
			t.Fatalf("first connection: reply to XID %d, accept state %d, results %x; want XID %d, OK", got, accept, res, want)
		}
	}
	if got, st := c.read(f, 0, 100); st != nfsclient.StatusOK || string(got) != "data" {
		t.Errorf("after the first attempt of the resent SETATTR ran: READ f: status %d, %q; want the written %q", st, got, "data")
	}
}

// TestResentRemoveAfterClientGaveUp: a REMOVE waits inside the server
// for the peer; the client gives up, closes the connection (as
// pkg/nfsclient does) and sends the REMOVE again on a new one. The first
// attempt removes the file once the peer answers; the resent call must
// get its reply, OK, though the connection it came on is gone. Before,
// the resent call ran after it and failed with NOENT.
func TestResentRemoveAfterClientGaveUp(t *testing.T) {
	p := serveHeld(t, "")
	c := dialNFS(t, p.addr)
	root := c.mount("/")
	_, st := c.create(root, "x")
	mustOK(t, "CREATE x", st)
	p.syncer.armed.Store(true)

	const xid = 90
	remove := rpcCall(xid, procRemove, dirop(root, "x"))
	first := rawConn(t, p.addr)
	if _, err := first.Write(remove); err != nil {
		t.Fatal(err)
	}
	p.held(t, "the REMOVE")
	first.Close()
	again := resend(t, p.addr, remove)
	select {
	case <-p.waiting:
	case <-time.After(callTimeout / 4):
		// Before the cache the resent REMOVE waited for the index's
		// lock, which the first attempt holds, and nothing said so:
		// the peer answers after a while, to see what the client gets.
		t.Error("the resent REMOVE did not wait for its first attempt")
	}
	p.release()
	mustAnswer(t, "the resent REMOVE", again, xid)
	if _, st := c.lookup(root, "x"); st != nfsclient.StatusNoEnt {
		t.Errorf("LOOKUP x after the REMOVE: status %d, want NOENT", st)
	}
}

// TestResentTruncateAfterReply: the reply to a SETATTR of the size is
// lost, the client writes and commits, and the SETATTR comes again (the
// client's resent copy, or its first copy late on a connection that was
// slow): it is answered from the cache and the data stays.
func TestResentTruncateAfterReply(t *testing.T) {
	addr, _ := serve(t, t.TempDir(), Fsync{})
	c := dialNFS(t, addr)
	f := newFile(t, c, "f")
	truncate := rpcCall(78, procSetattr, truncateArgs(f, 0))
	firstReply, st := exchange(t, addr, truncate)
	mustOK(t, "SETATTR size 0", st)
	writeCommitted(t, c, f, "data")
	again, st := exchange(t, addr, truncate)
	if st != nfsclient.StatusOK || !bytes.Equal(again, firstReply) {
		t.Errorf("the SETATTR again on a new connection: status %d, reply %x; want the first reply %x", st, again, firstReply)
	}
	if got, st := c.read(f, 0, 100); st != nfsclient.StatusOK || string(got) != "data" {
		t.Errorf("after the SETATTR came again: READ f: status %d, %q; want the committed %q", st, got, "data")
	}
}

// TestResentCallsAnsweredFromCache sends each call that is not
// idempotent twice, the second time on a new connection as a client
// whose reply was lost does: the second gets the first's reply, not the
// error of running it again (NOENT, EXIST).
func TestResentCallsAnsweredFromCache(t *testing.T) {
	addr, _ := serve(t, t.TempDir(), Fsync{})
	c := dialNFS(t, addr)
	root := c.mount("/")
	for _, name := range []string{"removed", "renamed"} {
		_, st := c.create(root, name)
		mustOK(t, "CREATE "+name, st)
	}
	_, st := c.mkdir(root, "rmdir")
	mustOK(t, "MKDIR rmdir", st)
	mode := uint32(0o755)
	for i, tc := range []struct {
		name string
		proc uint32
		args []byte
	}{
		{"REMOVE", procRemove, dirop(root, "removed")},
		{"RMDIR", procRmdir, dirop(root, "rmdir")},
		{"RENAME", procRename, append(dirop(root, "renamed"), dirop(root, "renamed2")...)},
		{"MKDIR", procMkdir, append(dirop(root, "dir"), sattr(&mode, nil)...)},
		{"SYMLINK", procSymlink, append(append(dirop(root, "link"), sattr(nil, nil)...), xdrOpaque([]byte("target"))...)},
		{"CREATE GUARDED", procCreate, append(append(dirop(root, "guarded"), u32s(1)...), sattr(&mode, nil)...)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			call := rpcCall(uint32(200+i), tc.proc, tc.args)
			first, st := exchange(t, addr, call)
			mustOK(t, tc.name, st)
			again, st := exchange(t, addr, call)
			if st != nfsclient.StatusOK || !bytes.Equal(again, first) {
				t.Errorf("%s again on a new connection: status %d, reply %x; want the first reply %x", tc.name, st, again, first)
			}
		})
	}
}

// TestResentCallsKeptApart: only the same call from the same client is
// answered from the cache; another XID, other arguments, another
// credential or another client's address run.
func TestResentCallsKeptApart(t *testing.T) {
	addr, _ := serve(t, t.TempDir(), Fsync{})
	c := dialNFS(t, addr)
	root := c.mount("/")
	exists := func(name string) bool {
		_, st := c.lookup(root, name)
		return st == nfsclient.StatusOK
	}
	remove := func(conn net.Conn, xid uint32, cred []byte, name string) uint32 {
		_, st := exchangeOn(t, conn, callRecord(xid, progNFS, nfsVersion, procRemove, cred, dirop(root, name)))
		return st
	}
	for _, name := range []string{"x", "y"} {
		_, st := c.create(root, name)
		mustOK(t, "CREATE "+name, st)
	}
	mustOK(t, "REMOVE x", remove(rawConn(t, addr), 5, rootCred, "x"))
	other := func() net.Conn {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(127, 0, 0, 2)}, Timeout: callTimeout}
		conn, err := nfsclient.DialReserved(context.Background(), d, "tcp", addr)
		if err != nil {
			t.Fatalf("dialing from 127.0.0.2: %v", err)
		}
		t.Cleanup(func() { conn.Close() })
		conn.SetDeadline(time.Now().Add(callTimeout))
		return conn
	}
	for _, tc := range []struct {
		name string
		conn func() net.Conn
		xid  uint32
		cred []byte
		file string
		runs bool
	}{
		{"the same call from another port", func() net.Conn { return rawConn(t, addr) }, 5, rootCred, "x", false},
		{"another XID", func() net.Conn { return rawConn(t, addr) }, 6, rootCred, "x", true},
		{"other arguments", func() net.Conn { return rawConn(t, addr) }, 5, rootCred, "y", true},
		{"another credential", func() net.Conn { return rawConn(t, addr) }, 5, authSysCred(0, 0, 1), "x", true},
		{"another client", other, 5, rootCred, "x", true},
	} {
		if !exists(tc.file) {
			_, st := c.create(root, tc.file)
			mustOK(t, "CREATE "+tc.file, st)
		}
		st := remove(tc.conn(), tc.xid, tc.cred, tc.file)
		if ran := !exists(tc.file); st != nfsclient.StatusOK || ran != tc.runs {
			t.Errorf("%s: REMOVE %s: status %d, run %v; want OK, run %v", tc.name, tc.file, st, ran, tc.runs)
		}
	}
}

// TestResentCallWaitEndsWhenClientLeaves: a REMOVE waits inside the
// server for the peer, and its copy sent again on a new connection waits
// for it; the client gives up on that connection too and closes it, as
// it does after every timeout. The server must let the connection go:
// before, the copy read nothing while it waited, so it never saw the
// client leave, and each resend kept a socket and its goroutines for as
// long as the first attempt ran.
func TestResentCallWaitEndsWhenClientLeaves(t *testing.T) {
	p := serveHeld(t, "")
	c := dialNFS(t, p.addr)
	root := c.mount("/")
	_, st := c.create(root, "x")
	mustOK(t, "CREATE x", st)
	p.syncer.armed.Store(true)

	remove := rpcCall(91, procRemove, dirop(root, "x"))
	first := rawConn(t, p.addr)
	if _, err := first.Write(remove); err != nil {
		t.Fatal(err)
	}
	p.held(t, "the REMOVE")
	again := rawConn(t, p.addr)
	if _, err := again.Write(remove); err != nil {
		t.Fatal(err)
	}
	select {
	case <-p.waiting:
	case <-time.After(callTimeout):
		t.Fatal("the resent REMOVE did not wait for its first attempt")
	}
	// Another call the client had sent after it, as Linux sends again
	// every call outstanding: the server reads it ahead, then the end.
	const getattr = 1
	if _, err := again.Write(rpcCall(92, getattr, xdrOpaque(root))); err != nil {
		t.Fatal(err)
	}
	if err := again.(*net.TCPConn).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	again.SetReadDeadline(time.Now().Add(callTimeout / 2))
	if n, err := again.Read(make([]byte, 1)); err != io.EOF {
		t.Errorf("the client closed the connection of the resent REMOVE while it waited: the server's side read %d bytes, %v; want it closed (EOF) while the first attempt still runs", n, err)
	}
}
