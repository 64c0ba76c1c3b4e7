package nfsd

import (
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestProxyCallsUnresolvedForAnotherReasonUnanswered (a review, forty-second
// session; failed on 7f8fbb8): a handle that cannot be
// resolved for a reason that is not the handle's (the design names ENOSYS
// from a dead supervisor under "duet exec", and I/O errors) must end the
// connection unanswered, so that the client sends the call again to the
// next server (connHandler.FromHandle; TestUnresolvedForAnotherReasonNotStale).
// The calls the proxy answers itself — UNSTABLE WRITE, COMMIT, ACCESS,
// FSINFO — resolve through Handler.pathOf instead, and answered such an
// error with NFS3ERR_IO; a Linux client then dropped the pages the COMMIT
// covered and failed the application's fsync with EIO. ELOOP (a directory
// on the path turned into a symlink) stands in here for ENOSYS: locate
// sorts both as "not the handle's".
func TestProxyCallsUnresolvedForAnotherReasonUnanswered(t *testing.T) {
	dir := t.TempDir()
	addr, _ := serve(t, dir, Fsync{})
	c := dialNFS(t, addr)
	vol, st := c.mkdir(c.mount("/"), "vol")
	mustOK(t, "MKDIR vol", st)
	f, st := c.create(vol, "f")
	mustOK(t, "CREATE vol/f", st)
	_, st = c.write(f, 0, []byte("acknowledged UNSTABLE"), 0)
	mustOK(t, "WRITE UNSTABLE", st)

	must(t, os.Rename(filepath.Join(dir, "vol"), filepath.Join(dir, "vol2")))
	must(t, os.Symlink("vol2", filepath.Join(dir, "vol")))

	answered := func(what string, rec []byte) (bool, uint32) {
		conn := rawConn(t, addr)
		conn.SetDeadline(time.Now().Add(3 * time.Second))
		if _, err := conn.Write(rec); err != nil {
			t.Fatal(err)
		}
		body, err := readReply(conn)
		if err != nil {
			t.Logf("%s: no reply (%v)", what, err)
			return false, 0
		}
		_, st := replyStatus(body)
		t.Logf("%s: answered, status %d", what, st)
		return true, st
	}
	if ok, _ := answered("GETATTR (go-nfs)", rpcCall(1, 1, xdrOpaque(f))); ok {
		t.Fatalf("GETATTR answered: the injected error is not one the design ends the connection for")
	}
	commit := rpcCall(2, procCommit, append(xdrOpaque(f), make([]byte, 12)...))
	if ok, st := answered("COMMIT (proxy)", commit); ok {
		t.Errorf("COMMIT answered with status %d where go-nfs's calls end the connection unanswered: the client fails the application's fsync instead of sending the COMMIT to the next server", st)
	}
	if ok, st := answered("WRITE UNSTABLE (proxy)", writeCall(3, f, 0, unstable, []byte("x"))); ok {
		t.Errorf("UNSTABLE WRITE answered with status %d where go-nfs's calls end the connection unanswered", st)
	}
}
