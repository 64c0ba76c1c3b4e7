package nfsd

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/nfsclient"
)

// silentClient is the client address whose replies block (a client gone
// silent, its socket full) until the server closes the connection.
var silentClient atomic.Value // string

// silentBlocked receives a value when a write to silentClient blocks.
var silentBlocked = make(chan struct{}, 1)

// silentConn is a server-side connection whose writes block while its
// client is silentClient.
type silentConn struct {
	net.Conn
	once   sync.Once
	closed chan struct{}
}

func (c *silentConn) Write(b []byte) (int, error) {
	if s, _ := silentClient.Load().(string); s != "" && s == c.RemoteAddr().String() {
		select {
		case silentBlocked <- struct{}{}:
		default:
		}
		<-c.closed // a dead client: its socket full
		return 0, net.ErrClosed
	}
	return c.Conn.Write(b)
}

func (c *silentConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// silentListener accepts silentConns.
type silentListener struct{ net.Listener }

func (l silentListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return &silentConn{Conn: c, closed: make(chan struct{})}, nil
}

// TestDuplicateBehindBlockedReply: on a connection whose client went
// silent, go-nfs's cached reply to a FILE_SYNC WRITE blocks in its write;
// the UNSTABLE WRITE pipelined after it still runs and is cached, so the
// client's resend of it on a new connection is answered, not held until
// the first connection's write fails. (Taking the call off the queue only
// after the write kept order but held the resend for as long as the write
// blocked.)
func TestDuplicateBehindBlockedReply(t *testing.T) {
	silentClient.Store("")
	t.Cleanup(func() { silentClient.Store("") })
	dir := t.TempDir()
	addr, _ := serveWith(t, dir, func(ctx context.Context, l net.Listener) error {
		return Serve(ctx, silentListener{l}, dir, Fsync{}, Squash{})
	})
	c := dialNFS(t, addr)
	f := newFile(t, c, "f")
	conn1 := rawConn(t, addr)
	silentClient.Store(conn1.LocalAddr().String())
	calls := append(writeCall(1, f, 0, uint32(nfsclient.FileSync), []byte("AAAA")),
		writeCall(2, f, 0, uint32(nfsclient.Unstable), []byte("BB"))...)
	if _, err := conn1.Write(calls); err != nil {
		t.Fatal(err)
	}
	// The resend must come once the first reply blocks and the UNSTABLE
	// WRITE behind it has run (its bytes are in the file): sent earlier,
	// it would be a first attempt and be answered whatever the order.
	select {
	case <-silentBlocked:
	case <-time.After(2 * time.Second):
		t.Fatal("the FILE_SYNC WRITE's reply to the silent client was never written")
	}
	for deadline := time.Now().Add(2 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		if b, _ := os.ReadFile(filepath.Join(dir, "f")); string(b) == "BBAA" {
			break
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(filepath.Join(dir, "f"))
			t.Fatalf("the UNSTABLE WRITE pipelined behind the blocked reply did not run in 2 s (file %q): it waits behind a blocked write", b)
		}
	}
	out := resend(t, addr, writeCall(2, f, 0, uint32(nfsclient.Unstable), []byte("BB")))
	select {
	case body := <-out:
		xid, st := replyStatus(body)
		if xid != 2 || st != 0 {
			t.Errorf("the resent UNSTABLE WRITE: reply XID %d, accept state %d; want XID 2, SUCCESS", xid, st)
		}
	case <-time.After(2 * time.Second):
		t.Errorf("duplicate of the UNSTABLE WRITE got no reply in 2 s: its first attempt waits behind a blocked write")
	}
	conn1.Close()
}
