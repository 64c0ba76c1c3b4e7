package nfsd

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/nfsclient"
)

// writeFull is a WRITE whose whole reply the test checks.
func (c *client) writeFull(fh []byte, off uint64, data []byte, stable nfsclient.Stable) (nfsclient.WriteResult, uint32) {
	c.t.Helper()
	return call(c, func(ctx context.Context) (nfsclient.WriteResult, error) {
		return c.c.Write(ctx, fh, off, data, stable)
	})
}

func (c *client) commitVerf(fh []byte) (uint64, uint32) {
	c.t.Helper()
	return call(c, func(ctx context.Context) (uint64, error) { return c.c.Commit(ctx, fh) })
}

// newFile mounts the export and creates name in its root.
func newFile(t testing.TB, c *client, name string) []byte {
	t.Helper()
	fh, st := c.create(c.mount("/"), name)
	mustOK(t, "CREATE "+name, st)
	return fh
}

// TestUnstableWriteSyncedAtCommit checks that an UNSTABLE WRITE is
// answered UNSTABLE without a sync and that COMMIT syncs it, while a
// FILE_SYNC WRITE is synced before its reply and says so.
func TestUnstableWriteSyncedAtCommit(t *testing.T) {
	syncer := &countingSyncer{}
	addr, _ := serve(t, t.TempDir(), syncer)
	c := dialNFS(t, addr)
	f := newFile(t, c, "f")
	before := syncer.count("f") // the CREATE's

	w, st := c.writeFull(f, 0, []byte("hello"), nfsclient.Unstable)
	mustOK(t, "WRITE UNSTABLE", st)
	if w.Committed != nfsclient.Unstable || w.Count != 5 {
		t.Errorf("WRITE UNSTABLE: committed %d, count %d; want UNSTABLE (0), 5", w.Committed, w.Count)
	}
	if n := syncer.count("f") - before; n != 0 {
		t.Errorf("WRITE UNSTABLE: f synced %d times before the reply, want 0", n)
	}
	verf, st := c.commitVerf(f)
	mustOK(t, "COMMIT", st)
	if n := syncer.count("f") - before; n != 1 {
		t.Errorf("COMMIT: f synced %d times, want 1", n)
	}
	if verf != w.Verifier {
		t.Errorf("COMMIT verifier %#x, WRITE's %#x: the same server", verf, w.Verifier)
	}

	w, st = c.writeFull(f, 5, []byte(" world"), nfsclient.FileSync)
	mustOK(t, "WRITE FILE_SYNC", st)
	if w.Committed != nfsclient.FileSync {
		t.Errorf("WRITE FILE_SYNC: committed %d, want FILE_SYNC (2)", w.Committed)
	}
	if n := syncer.count("f") - before; n != 2 {
		t.Errorf("WRITE FILE_SYNC: f synced %d times in all, want 2 (COMMIT, this WRITE)", n)
	}
	if w.Verifier != verf {
		t.Errorf("WRITE FILE_SYNC verifier %#x, COMMIT's %#x: go-nfs and the proxy disagree", w.Verifier, verf)
	}
	if got, st := c.read(f, 0, 100); st != nfsclient.StatusOK || string(got) != "hello world" {
		t.Errorf("READ f: status %d, %q; want %q", st, got, "hello world")
	}
}

// failingSyncer fails once fail is set.
type failingSyncer struct{ fail atomic.Bool }

func (s *failingSyncer) Sync(f *os.File) error {
	if s.fail.Load() {
		return errors.New("the peer did not confirm")
	}
	return f.Sync()
}

// TestCommitSyncFails checks that a COMMIT whose sync fails is an error:
// a client told OK would drop the only copy of its data.
func TestCommitSyncFails(t *testing.T) {
	syncer := &failingSyncer{}
	addr, _ := serve(t, t.TempDir(), syncer)
	c := dialNFS(t, addr)
	f := newFile(t, c, "f")
	_, st := c.writeFull(f, 0, []byte("data"), nfsclient.Unstable)
	mustOK(t, "WRITE UNSTABLE", st)
	syncer.fail.Store(true)
	if _, st := c.commitVerf(f); st != nfsclient.StatusIO {
		t.Errorf("COMMIT with a failing sync: status %d, want NFS3ERR_IO (%d)", st, nfsclient.StatusIO)
	}
}

// TestVerifierChangesAcrossServers writes UNSTABLE to one server and
// commits on the next one of the same export, as after a failover: the
// COMMIT's verifier differs from the WRITE's, which tells the client to
// write again what it had not committed.
func TestVerifierChangesAcrossServers(t *testing.T) {
	dir := t.TempDir()
	addr, stop := serve(t, dir, Fsync{})
	c := dialNFS(t, addr)
	f := newFile(t, c, "f")
	w, st := c.writeFull(f, 0, []byte("unstable"), nfsclient.Unstable)
	mustOK(t, "WRITE UNSTABLE on the first server", st)
	stop()

	addr, _ = serve(t, dir, Fsync{})
	c.point(addr)
	verf, st := c.commitVerf(f)
	mustOK(t, "COMMIT on the second server", st)
	if verf == w.Verifier {
		t.Fatalf("COMMIT on the second server: verifier %#x, the same as the first server's WRITE: the client would not resend", verf)
	}
	w2, st := c.writeFull(f, 0, []byte("unstable"), nfsclient.Unstable)
	mustOK(t, "WRITE UNSTABLE on the second server", st)
	if w2.Verifier != verf {
		t.Errorf("second server: WRITE verifier %#x, COMMIT's %#x", w2.Verifier, verf)
	}
}

// rpcCall encodes one NFSv3 call as a record with root's AUTH_SYS
// credential.
func rpcCall(xid, proc uint32, args []byte) []byte {
	return callRecord(xid, progNFS, nfsVersion, proc, rootCred, args)
}

// rootCred is an AUTH_SYS credential of uid 0, gid 0.
var rootCred = authSysCred(0, 0)

// authSysCred encodes an AUTH_SYS credential: flavor, then the body.
func authSysCred(uid, gid uint32, gids ...uint32) []byte {
	body := append(u32s(0), xdrOpaque([]byte("client"))...) // stamp, machine name
	body = append(body, u32s(uid, gid, uint32(len(gids)))...)
	body = append(body, u32s(gids...)...)
	return append(u32s(authSys), xdrOpaque(body)...)
}

// callRecord encodes a call with the credential cred (flavor and body) and
// an AUTH_NONE verifier as a record.
func callRecord(xid, prog, vers, proc uint32, cred, args []byte) []byte {
	b := u32s(0, xid, msgCall, rpcVersion, prog, vers, proc)
	b = append(b, cred...)
	b = append(b, u32s(0, 0)...)
	b = append(b, args...)
	binary.BigEndian.PutUint32(b, uint32(len(b)-4)|lastFragment)
	return b
}

func u32s(vs ...uint32) []byte {
	var b []byte
	for _, v := range vs {
		b = binary.BigEndian.AppendUint32(b, v)
	}
	return b
}

func xdrOpaque(b []byte) []byte {
	out := append(u32s(uint32(len(b))), b...)
	for len(out)%4 != 0 {
		out = append(out, 0)
	}
	return out
}

func writeCall(xid uint32, fh []byte, off uint64, stable uint32, data []byte) []byte {
	return rpcCall(xid, procWrite, encodeWrite(fh, off, stable, data))
}

// encodeWrite encodes WRITE3args.
func encodeWrite(fh []byte, off uint64, stable uint32, data []byte) []byte {
	args := append(xdrOpaque(fh), binary.BigEndian.AppendUint64(nil, off)...)
	args = append(args, u32s(uint32(len(data)), stable)...)
	return append(args, xdrOpaque(data)...)
}

func readCall(xid uint32, fh []byte, off uint64, n uint32) []byte {
	args := append(xdrOpaque(fh), binary.BigEndian.AppendUint64(nil, off)...)
	return rpcCall(xid, 6, append(args, u32s(n)...))
}

// rawConn is a TCP connection to the server on which the test writes
// records by hand.
func rawConn(t *testing.T, addr string) net.Conn {
	t.Helper()
	conn, err := dialTCP(addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	conn.SetDeadline(time.Now().Add(callTimeout))
	return conn
}

// reply reads one reply record and returns its XID, accept state and
// results.
func reply(t *testing.T, conn net.Conn) (xid, accept uint32, res []byte) {
	t.Helper()
	body := replyBody(t, conn)
	if len(body) < 24 {
		t.Fatalf("a reply of %d bytes: %x", len(body), body)
	}
	return binary.BigEndian.Uint32(body), binary.BigEndian.Uint32(body[20:]), body[24:]
}

// replyBody reads one reply record.
func replyBody(t *testing.T, conn net.Conn) []byte {
	t.Helper()
	body, err := readReply(conn)
	if err != nil {
		t.Fatal(err)
	}
	return body
}

// readReply reads one reply record, for a goroutine of a test.
func readReply(conn net.Conn) ([]byte, error) {
	var mark [4]byte
	if _, err := io.ReadFull(conn, mark[:]); err != nil {
		return nil, fmt.Errorf("reading a reply: %w", err)
	}
	body := make([]byte, binary.BigEndian.Uint32(mark[:])&^lastFragment)
	if _, err := io.ReadFull(conn, body); err != nil {
		return nil, fmt.Errorf("reading a reply: %w", err)
	}
	return body, nil
}

// TestPipelinedCallsKeepOrder sends, on one connection and without
// waiting for replies, a FILE_SYNC WRITE (go-nfs's), an UNSTABLE WRITE
// over part of it (the proxy's) and a READ (go-nfs's): each call sees the
// one before, as the client sent them, and the replies come in that
// order too. go-nfs's reply to the first is held a while between its
// caching and its sending: the UNSTABLE WRITE, which waits for go-nfs to
// have answered, must not be answered in that window (it was, once in CI).
func TestPipelinedCallsKeepOrder(t *testing.T) {
	testHookReplyKept = func() { time.Sleep(50 * time.Millisecond) }
	t.Cleanup(func() { testHookReplyKept = nil })
	addr, _ := serve(t, t.TempDir(), Fsync{})
	c := dialNFS(t, addr)
	f := newFile(t, c, "f")
	conn := rawConn(t, addr)
	var calls []byte
	calls = append(calls, writeCall(1, f, 0, uint32(nfsclient.FileSync), []byte("AAAA"))...)
	calls = append(calls, writeCall(2, f, 0, uint32(nfsclient.Unstable), []byte("BB"))...)
	calls = append(calls, readCall(3, f, 0, 100)...)
	if _, err := conn.Write(calls); err != nil {
		t.Fatal(err)
	}
	for want := uint32(1); want <= 3; want++ {
		xid, accept, res := reply(t, conn)
		if xid != want || accept != 0 {
			t.Fatalf("reply %d: XID %d, accept state %d; want XID %d, SUCCESS", want, xid, accept, want)
		}
		if st := binary.BigEndian.Uint32(res); st != nfsclient.StatusOK {
			t.Fatalf("call %d: status %d", xid, st)
		}
		if xid == 3 && !bytes.HasSuffix(res, xdrOpaque([]byte("BBAA"))) {
			t.Errorf("READ after the pipelined WRITEs: results %x, want the data %q", res, "BBAA")
		}
	}
}

// TestGarbageRecords sends records no server could answer: the
// connection is closed (not left hanging), or a call with undecodable
// arguments answered GARBAGE_ARGS, and the server goes on serving.
func TestGarbageRecords(t *testing.T) {
	addr, _ := serve(t, t.TempDir(), Fsync{})
	c := dialNFS(t, addr)
	f := newFile(t, c, "f")
	okWrite := writeCall(9, f, 0, uint32(nfsclient.Unstable), []byte("ok"))
	longAuth := rpcCall(5, procCommit, nil)
	binary.BigEndian.PutUint32(longAuth[32:], 1000) // the credential's length
	bigCommit := rpcCall(6, procCommit, make([]byte, callHeaderMax))
	binary.BigEndian.PutUint32(bigCommit, (maxIntercepted+4)|lastFragment)
	for _, tc := range []struct {
		name   string
		record []byte
	}{
		{"a first fragment that is not the last", u32s(40, 1, 0, 2, progNFS, 3, 0, 0, 0, 0, 0)},
		{"a record shorter than a call header", u32s(8|lastFragment, 1, 0)},
		{"a reply where a call belongs", u32s(40|lastFragment, 1, msgReply, 2, progNFS, 3, 0, 0, 0, 0, 0)},
		{"a credential over 400 bytes", longAuth},
		{"a COMMIT of more than the limit", bigCommit},
	} {
		conn := rawConn(t, addr)
		if _, err := conn.Write(tc.record); err != nil {
			t.Fatal(err)
		}
		// EOF, or a reset when the server closed with bytes unread.
		if n, err := conn.Read(make([]byte, 64)); err != io.EOF && !errors.Is(err, syscall.ECONNRESET) {
			t.Errorf("%s: read %d bytes, %v; want the connection closed", tc.name, n, err)
		}
	}

	// Arguments cut short: GARBAGE_ARGS, and the connection serves on.
	conn := rawConn(t, addr)
	cut := writeCall(7, f, 0, uint32(nfsclient.Unstable), []byte("data"))
	cut = cut[:len(cut)-12]
	binary.BigEndian.PutUint32(cut, uint32(len(cut)-4)|lastFragment)
	if _, err := conn.Write(append(cut, okWrite...)); err != nil {
		t.Fatal(err)
	}
	if xid, accept, _ := reply(t, conn); xid != 7 || accept != garbageArgs {
		t.Errorf("WRITE cut short: XID %d, accept state %d; want 7, GARBAGE_ARGS (%d)", xid, accept, garbageArgs)
	}
	if xid, accept, res := reply(t, conn); xid != 9 || accept != 0 || binary.BigEndian.Uint32(res) != nfsclient.StatusOK {
		t.Errorf("WRITE after the garbage: XID %d, accept state %d; want 9, SUCCESS, OK", xid, accept)
	}

	// A record cut by the client closing.
	conn = rawConn(t, addr)
	conn.Write(okWrite[:len(okWrite)-3])
	conn.Close()

	if got, st := c.read(f, 0, 10); st != nfsclient.StatusOK || string(got) != "ok" {
		t.Errorf("READ after the garbage: status %d, %q; want %q", st, got, "ok")
	}
}

// sleepySyncer stands for the peer: each sync waits 1 ms more.
type sleepySyncer struct{}

func (sleepySyncer) Sync(f *os.File) error {
	time.Sleep(time.Millisecond)
	return f.Sync()
}

// BenchmarkSequentialUnstable writes 64 KiB UNSTABLE WRITEs with a
// COMMIT every MiB, as the Linux client does, against a sync that costs
// a peer's round trip; it reports the same bytes written FILE_SYNC,
// which sync every WRITE, beside it.
func BenchmarkSequentialUnstable(b *testing.B) {
	const chunk, perCommit = 64 << 10, 16
	addr, _ := serve(b, b.TempDir(), sleepySyncer{})
	c := dialNFS(b, addr)
	f := newFile(b, c, "f")
	data := bytes.Repeat([]byte("d"), chunk)
	mib := func(stable nfsclient.Stable, i int) {
		for k := range perCommit {
			off := uint64(i*perCommit+k) * chunk
			if _, st := c.writeFull(f, off, data, stable); st != nfsclient.StatusOK {
				b.Fatalf("WRITE: status %d", st)
			}
		}
		if stable == nfsclient.Unstable {
			if _, st := c.commitVerf(f); st != nfsclient.StatusOK {
				b.Fatalf("COMMIT: status %d", st)
			}
		}
	}
	b.SetBytes(chunk * perCommit)
	b.ResetTimer()
	for i := range b.N {
		mib(nfsclient.Unstable, i)
	}
	b.StopTimer()
	unstableRate := float64(b.N) * chunk * perCommit / b.Elapsed().Seconds() / 1e6
	start := time.Now()
	for i := range b.N {
		mib(nfsclient.FileSync, i)
	}
	syncRate := float64(b.N) * chunk * perCommit / time.Since(start).Seconds() / 1e6
	b.ReportMetric(syncRate, "filesync-MB/s")
	b.ReportMetric(unstableRate/syncRate, "x-filesync")
}

func TestStatusOf(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want uint32
	}{
		{nil, nfsOK},
		{errStale, nfsStale},
		{&os.PathError{Op: "open", Path: "f", Err: syscall.ENOENT}, nfsStale},
		{&os.PathError{Op: "write", Path: "f", Err: syscall.ENOSPC}, nfsNoSpc},
		{&os.PathError{Op: "write", Path: "f", Err: syscall.EDQUOT}, nfsDQuot},
		{&os.PathError{Op: "write", Path: "f", Err: syscall.EFBIG}, nfsFBig},
		{&os.PathError{Op: "open", Path: "f", Err: syscall.EISDIR}, nfsIsDir},
		{&os.PathError{Op: "open", Path: "f", Err: syscall.EACCES}, nfsAcces},
		{&os.PathError{Op: "write", Path: "f", Err: syscall.EIO}, nfsIO},
		{errors.New("the peer did not confirm"), nfsIO},
	} {
		if got := statusOf(tc.err); got != tc.want {
			t.Errorf("statusOf(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}

// errseqSyncer fails the first sync after arm, then succeeds: as fsync(2)
// does after a write-back error, which each open file description is
// told once and a description opened after some other one was told is
// not told at all. The pages the error hit are gone either way.
type errseqSyncer struct{ armed atomic.Bool }

func (s *errseqSyncer) Sync(f *os.File) error {
	if s.armed.CompareAndSwap(true, false) {
		return &os.PathError{Op: "sync", Path: f.Name(), Err: syscall.EIO}
	}
	return f.Sync()
}

// TestSyncErrorChangesVerifier writes UNSTABLE, lets another call's sync
// of the same file see the write-back error that lost those bytes (a
// FILE_SYNC WRITE, a truncating SETATTR, another client's COMMIT), then
// commits: the COMMIT's fsync finds nothing to report, so its verifier
// must differ from the WRITE's, or the client drops the only copy of
// bytes the server lost.
func TestSyncErrorChangesVerifier(t *testing.T) {
	for _, tc := range []struct {
		name  string
		other func(c *client, f []byte) uint32 // the call whose sync sees the error
	}{
		{"FILE_SYNC WRITE", func(c *client, f []byte) uint32 {
			_, st := c.writeFull(f, 100, []byte("x"), nfsclient.FileSync)
			return st
		}},
		{"SETATTR size", func(c *client, f []byte) uint32 {
			// go-nfs answers a SETATTR whose sync failed GARBAGE_ARGS:
			// a failure too, which is all this case needs.
			ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
			defer cancel()
			size := uint64(200)
			if err := c.c.Setattr(ctx, f, nfsclient.SetAttr{Size: &size}); err != nil {
				return nfsclient.StatusIO
			}
			return nfsclient.StatusOK
		}},
		{"another COMMIT", func(c *client, f []byte) uint32 { _, st := c.commitVerf(f); return st }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			syncer := &errseqSyncer{}
			addr, _ := serve(t, t.TempDir(), syncer)
			c, other := dialNFS(t, addr), dialNFS(t, addr)
			f := newFile(t, c, "f")
			w, st := c.writeFull(f, 0, []byte("unstable"), nfsclient.Unstable)
			mustOK(t, "WRITE UNSTABLE", st)
			syncer.armed.Store(true)
			if st := tc.other(other, f); st == nfsclient.StatusOK {
				t.Fatalf("%s whose sync failed: OK", tc.name)
			}
			verf, st := c.commitVerf(f)
			if st == nfsclient.StatusOK && verf == w.Verifier {
				t.Errorf("COMMIT after a sync of f failed: OK with the WRITE's verifier %#x: the client forgets bytes the server may have lost", verf)
			}
		})
	}
}
