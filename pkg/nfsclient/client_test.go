package nfsclient_test

import (
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/nfsclient"
)

// fake is an RPC server whose answers a test chooses, to break the
// transport in ways a real server does not on demand.
type fake struct {
	l      net.Listener
	answer func(n int) (reply []byte, hangUp bool)
	mu     sync.Mutex
	xids   []uint32 // of every call received, in order
	conns  []net.Conn
	// received gets a value for each call, without blocking.
	received chan struct{}
}

// newFake serves until the test ends. answer gets the number of the call
// (from 1, across connections) and returns the reply after the XID: nil
// never answers (a black hole), hangUp closes the connection instead.
func newFake(t *testing.T, answer func(n int) (reply []byte, hangUp bool)) *fake {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fake{l: l, answer: answer, received: make(chan struct{}, 100)}
	t.Cleanup(func() {
		l.Close()
		f.mu.Lock()
		defer f.mu.Unlock()
		for _, c := range f.conns {
			c.Close()
		}
	})
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			f.mu.Lock()
			f.conns = append(f.conns, c)
			f.mu.Unlock()
			go f.serve(c)
		}
	}()
	return f
}

func (f *fake) serve(c net.Conn) {
	defer c.Close()
	for {
		var hdr [4]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		call := make([]byte, binary.BigEndian.Uint32(hdr[:])&^(1<<31))
		if _, err := io.ReadFull(c, call); err != nil {
			return
		}
		f.mu.Lock()
		f.xids = append(f.xids, binary.BigEndian.Uint32(call))
		n := len(f.xids)
		f.mu.Unlock()
		select {
		case f.received <- struct{}{}:
		default:
		}
		reply, hangUp := f.answer(n)
		if hangUp {
			return
		}
		if reply == nil {
			continue
		}
		msg := binary.BigEndian.AppendUint32(nil, uint32(4+len(reply))|1<<31)
		msg = append(msg, call[:4]...)
		if _, err := c.Write(append(msg, reply...)); err != nil {
			return
		}
	}
}

func (f *fake) calls() []uint32 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]uint32(nil), f.xids...)
}

// dialer dials addr and counts the connections it made and the dials
// that failed; failed receives each failure without blocking.
type dialer struct {
	addr   string
	mu     sync.Mutex
	ok     int
	failed chan error
}

func newDialer(addr string) *dialer { return &dialer{addr: addr, failed: make(chan error, 100)} }

func (d *dialer) dial(ctx context.Context) (net.Conn, error) {
	c, err := nfsclient.DialReserved(ctx, net.Dialer{}, "tcp", d.addr)
	if err != nil {
		select {
		case d.failed <- err:
		default:
		}
		return nil, err
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.ok++
	return c, nil
}

func (d *dialer) conns() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ok
}

// reply bodies after the XID: a REPLY, MSG_ACCEPTED with an AUTH_NULL
// verifier, then the accept state and what follows it.
func accepted(words ...uint32) []byte {
	b := []byte(nil)
	for _, w := range append([]uint32{1, 0, 0, 0}, words...) {
		b = binary.BigEndian.AppendUint32(b, w)
	}
	return b
}

var nullOK = accepted(0)

// TestRetriesOnTransportErrors checks that a call whose connection breaks
// or stays silent is sent again, with its XID, on a new connection and
// returns the reply that comes there.
func TestRetriesOnTransportErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		first func() ([]byte, bool)
	}{
		{"connection closed", func() ([]byte, bool) { return nil, true }},
		{"no reply", func() ([]byte, bool) { return nil, false }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t, func(n int) ([]byte, bool) {
				if n == 1 {
					return tc.first()
				}
				return nullOK, false
			})
			d := newDialer(f.l.Addr().String())
			c := nfsclient.New(d.dial)
			defer c.Close()
			c.Timeout = 200 * time.Millisecond
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			if err := c.Null(ctx); err != nil {
				t.Fatalf("NULL: %v", err)
			}
			xids := f.calls()
			if len(xids) != 2 || xids[0] != xids[1] {
				t.Errorf("the server got calls with XIDs %v, want the call and its retransmission", xids)
			}
			if n := d.conns(); n != 2 {
				t.Errorf("%d connections, want 2", n)
			}
		})
	}
}

// TestRPCErrorsNotRetried checks that a call the server refuses at the
// RPC layer fails at once with an RPCError.
func TestRPCErrorsNotRetried(t *testing.T) {
	for _, tc := range []struct {
		name  string
		reply []byte
		want  string
	}{
		{"PROG_MISMATCH", accepted(2, 2, 2), "NULL: call not accepted: PROG_MISMATCH (versions 2 to 2)"},
		{"PROC_UNAVAIL", accepted(3), "NULL: call not accepted: PROC_UNAVAIL (3)"},
		{"AUTH_ERROR", []byte{0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 5}, "NULL: call denied: AUTH_ERROR 5"},
		{"cut short", []byte{0, 0, 0, 1, 0, 0, 0, 0}, "NULL: reply header cut short"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFake(t, func(int) ([]byte, bool) { return tc.reply, false })
			c := nfsclient.New(newDialer(f.l.Addr().String()).dial)
			defer c.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			err := c.Null(ctx)
			var re *nfsclient.RPCError
			if !errors.As(err, &re) || err.Error() != tc.want {
				t.Errorf("NULL: %v, want RPCError %q", err, tc.want)
			}
			if n := len(f.calls()); n != 1 {
				t.Errorf("the call was sent %d times, want once", n)
			}
		})
	}
}

// TestCallEndsWithContext checks that a call to a server that is gone
// returns soon after its context ends, with the context's error and the
// last transport error, whatever the server's silence looks like.
func TestCallEndsWithContext(t *testing.T) {
	refused, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	refused.Close()
	silent := newFake(t, func(int) ([]byte, bool) { return nil, false })
	for _, tc := range []struct {
		name, addr string
		lastErr    error // the transport error the message names
	}{
		{"connection refused", refused.Addr().String(), syscall.ECONNREFUSED},
		// The default attempt timeout (5 s) outlives the context: the
		// context must cut the attempt short.
		{"black hole", silent.l.Addr().String(), nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := nfsclient.New(newDialer(tc.addr).dial)
			defer c.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
			defer cancel()
			start := time.Now()
			_, err := c.Getattr(ctx, []byte{1})
			if took := time.Since(start); took > 2*time.Second {
				t.Errorf("GETATTR returned %v after the start, its context ended after 300ms", took)
			}
			if !errors.Is(err, context.DeadlineExceeded) {
				t.Errorf("GETATTR: %v, want the context's error", err)
			}
			if tc.lastErr != nil && !errors.Is(err, tc.lastErr) {
				t.Errorf("GETATTR: %v, want it to name %v", err, tc.lastErr)
			}
			if _, ok := nfsclient.StatusOf(err); ok {
				t.Errorf("GETATTR: %v is a StatusError", err)
			}
		})
	}
}

// TestCloseEndsCall checks that Close ends a call waiting on a silent
// server with ErrClosed, and that later calls fail the same way.
func TestCloseEndsCall(t *testing.T) {
	silent := newFake(t, func(int) ([]byte, bool) { return nil, false })
	c := nfsclient.New(newDialer(silent.l.Addr().String()).dial)
	done := make(chan error, 1)
	go func() { done <- c.Null(context.Background()) }()
	select {
	case <-silent.received:
	case <-time.After(5 * time.Second):
		t.Fatal("the call did not reach the server in 5 s")
	}
	c.Close()
	select {
	case err := <-done:
		if !errors.Is(err, nfsclient.ErrClosed) {
			t.Errorf("NULL during Close: %v, want ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("NULL still waiting 5 s after Close")
	}
	if err := c.Null(context.Background()); !errors.Is(err, nfsclient.ErrClosed) {
		t.Errorf("NULL after Close: %v, want ErrClosed", err)
	}
}

// TestStatusErrorText checks what a StatusError says and that IsStale
// finds STALE, wrapped or not, and nothing else.
func TestStatusErrorText(t *testing.T) {
	for _, tc := range []struct {
		err  nfsclient.StatusError
		want string
	}{
		{nfsclient.StatusError{Proc: "WRITE", Status: nfsclient.StatusStale}, "WRITE: NFS3ERR_STALE (70)"},
		{nfsclient.StatusError{Proc: "MNT", Status: nfsclient.StatusNoEnt}, "MNT: MNT3ERR_NOENT (2)"},
		{nfsclient.StatusError{Proc: "READ", Status: 4242}, "READ: unknown status (4242)"},
	} {
		if got := tc.err.Error(); got != tc.want {
			t.Errorf("%#v: %q, want %q", tc.err, got, tc.want)
		}
	}
	wrapped := errors.Join(errors.New("context"), &nfsclient.StatusError{Proc: "GETATTR", Status: nfsclient.StatusStale})
	if !nfsclient.IsStale(wrapped) {
		t.Errorf("IsStale(%v) = false", wrapped)
	}
	for _, err := range []error{nil, errors.New("STALE"), &nfsclient.StatusError{Proc: "READ", Status: nfsclient.StatusNoEnt}} {
		if nfsclient.IsStale(err) {
			t.Errorf("IsStale(%v) = true", err)
		}
	}
}
