// Package nfsclient is an NFSv3 client over ONC RPC on TCP that behaves
// like a Linux "hard" mount: a call whose connection breaks is sent again
// on a new connection until its context ends, and NFS status errors reach
// the caller as they are. It keeps raw file handles, so a client behind a
// moving virtual IP uses the handles the old server gave out against the
// new one, without a new mount — which is what tests of pkg/nfsd's
// failover need and a kernel mount would hide.
//
// It speaks MOUNT v3 and NFSv3 on one TCP port (no portmapper), as
// pkg/nfsd serves them, with AUTH_SYS credentials (Client.Cred).
package nfsclient

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"sync"
	"time"
)

// Client is a connection to one NFSv3 server, made again after every
// transport error. It is safe for concurrent use; calls are sent one at a
// time, in the order they get their turn.
type Client struct {
	// Timeout bounds one attempt of a call (dial, send, reply): a
	// connection that stays silent longer, black-holed by a moved VIP or
	// a dead peer, is abandoned and the call sent on a new one. Zero
	// means 5 s.
	Timeout time.Duration
	// RetryDelay is the pause after a failed attempt, so that a refused
	// dial does not spin. Zero means 100 ms.
	RetryDelay time.Duration
	// Cred is the user every call acts as (AUTH_SYS); the zero value is
	// root. Set it before the first call.
	Cred Cred

	dial func(ctx context.Context) (net.Conn, error)
	turn chan struct{} // held by the call that uses the connection
	xid  uint32        // under turn

	mu     sync.Mutex // conn and closed: Close may run during a call
	conn   net.Conn
	closed bool
}

// New returns a client that connects with dial when a call first needs a
// connection and again after each transport error. dial's context ends
// with the attempt.
func New(dial func(ctx context.Context) (net.Conn, error)) *Client {
	// A random first XID, as Linux does: a server's duplicate request
	// cache must not take a new client's calls for an old one's.
	return &Client{dial: dial, turn: make(chan struct{}, 1), xid: rand.Uint32()}
}

// Cred is an AUTH_SYS credential (RFC 5531): the user's uid, gid and
// supplementary gids (at most 16).
type Cred struct {
	UID, GID uint32
	GIDs     []uint32
}

// encode appends the credential and an AUTH_NONE verifier.
func (c Cred) encode(e enc) enc {
	body := enc{}.u32(0).opaque(nil).u32(c.UID).u32(c.GID).u32(uint32(len(c.GIDs)))
	for _, g := range c.GIDs {
		body = body.u32(g)
	}
	return e.u32(authSys).opaque(body).u32(0).u32(0)
}

// ErrClosed is returned by calls on a closed Client.
var ErrClosed = errors.New("nfs client closed")

// Close closes the connection; running and later calls return ErrClosed.
func (c *Client) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.closed = true
	if c.conn == nil {
		return nil
	}
	err := c.conn.Close()
	c.conn = nil
	return err
}

// RPCError is a call the server refused at the RPC layer (RFC 5531: RPC
// or program version mismatch, unknown procedure, garbage arguments,
// authentication) or answered with a reply that cannot be decoded. It is
// not retried: sending the call again gets the same answer.
type RPCError struct {
	Proc   string // the procedure, as "WRITE"
	Reason string
}

func (e *RPCError) Error() string { return e.Proc + ": " + e.Reason }

// ONC RPC programs, versions and constants (RFC 5531, RFC 1813).
const (
	progMount = 100005
	progNFS   = 100003
	version3  = 3

	rpcVersion  = 2
	authSys     = 1
	msgCall     = 0
	msgReply    = 1
	replyOK     = 0 // MSG_ACCEPTED
	acceptOK    = 0 // SUCCESS
	lastFrag    = 1 << 31
	maxRecord   = 64 << 20
	defTimeout  = 5 * time.Second
	defRetryGap = 100 * time.Millisecond
)

var acceptStates = map[uint32]string{1: "PROG_UNAVAIL", 2: "PROG_MISMATCH", 3: "PROC_UNAVAIL", 4: "GARBAGE_ARGS", 5: "SYSTEM_ERR"}

// call sends one call until a reply comes or ctx ends, and returns the
// procedure's results.
func (c *Client) call(ctx context.Context, prog, proc uint32, name string, args enc) (*dec, error) {
	select {
	case c.turn <- struct{}{}:
	case <-ctx.Done():
		return nil, fmt.Errorf("%s: waiting for the connection: %w", name, ctx.Err())
	}
	defer func() { <-c.turn }()
	// One XID for every attempt, as a retransmission keeps it.
	c.xid++
	xid := c.xid
	msg := c.Cred.encode(enc{}.u32(0).u32(xid).u32(msgCall).u32(rpcVersion).u32(prog).u32(version3).u32(proc))
	msg = append(msg, args...)
	binary.BigEndian.PutUint32(msg, uint32(len(msg)-4)|lastFrag) // one fragment
	// The last transport error not caused by ctx.
	var last error
	for {
		body, reused, err := c.attempt(ctx, xid, msg)
		if err == nil {
			return c.results(name, body)
		}
		if errors.Is(err, ErrClosed) || c.isClosed() {
			return nil, fmt.Errorf("%s: %w", name, ErrClosed)
		}
		// An attempt cut by ctx's deadline may fail (an i/o timeout from
		// the dialer's poller) a moment before ctx reports it ended.
		if dl, ok := ctx.Deadline(); ctx.Err() == nil && (!ok || time.Now().Before(dl)) {
			last = err
		}
		c.drop()
		// A connection that served earlier calls may have died idle (the
		// server stopped, the VIP moved): redial at once, as Linux does.
		// A fresh one failing waits, so a refused dial does not spin.
		if !reused && ctx.Err() == nil {
			t := time.NewTimer(c.retryDelay())
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
			}
		}
		if ctx.Err() != nil {
			if last == nil {
				return nil, fmt.Errorf("%s: %w", name, ctx.Err())
			}
			return nil, fmt.Errorf("%s: %w (last transport error: %w)", name, ctx.Err(), last)
		}
	}
}

// attempt sends msg on the connection, dialing one if there is none, and
// returns the body of the reply to xid and whether the connection was an
// earlier call's.
func (c *Client) attempt(ctx context.Context, xid uint32, msg []byte) (body []byte, reused bool, err error) {
	actx, cancel := context.WithTimeout(ctx, c.timeout())
	defer cancel()
	conn, reused, err := c.connect(actx)
	if err != nil {
		return nil, false, err
	}
	deadline, _ := actx.Deadline()
	conn.SetDeadline(deadline)
	// Cut a blocked read or write short when ctx ends before the deadline.
	stop := context.AfterFunc(actx, func() { conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if _, err := conn.Write(msg); err != nil {
		return nil, reused, fmt.Errorf("sending: %w", err)
	}
	body, err = readRecord(conn)
	if err != nil {
		return nil, reused, fmt.Errorf("reading the reply: %w", err)
	}
	// One call at a time per connection, and none after a failed one:
	// another XID means the stream is out of step.
	if len(body) < 4 || binary.BigEndian.Uint32(body) != xid {
		return nil, reused, fmt.Errorf("a reply that is not to XID %d", xid)
	}
	return body[4:], reused, nil
}

// connect returns the connection, and whether it was there already, or
// dials one.
func (c *Client) connect(ctx context.Context) (conn net.Conn, reused bool, err error) {
	c.mu.Lock()
	conn, closed := c.conn, c.closed
	c.mu.Unlock()
	switch {
	case closed:
		return nil, false, ErrClosed
	case conn != nil:
		return conn, true, nil
	}
	conn, err = c.dial(ctx)
	if err != nil {
		return nil, false, fmt.Errorf("dialing: %w", err)
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		conn.Close()
		return nil, false, ErrClosed
	}
	c.conn = conn
	return conn, false, nil
}

func (c *Client) isClosed() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.closed
}

// drop closes the connection after a failed attempt: a reply may be
// half-read, or the server gone.
func (c *Client) drop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn != nil {
		c.conn.Close()
		c.conn = nil
	}
}

// readRecord reads one record of the record marking standard: fragments
// up to the last one.
func readRecord(r io.Reader) ([]byte, error) {
	var body []byte
	for {
		var hdr [4]byte
		if _, err := io.ReadFull(r, hdr[:]); err != nil {
			return nil, err
		}
		n := binary.BigEndian.Uint32(hdr[:])
		size := int(n &^ lastFrag)
		if len(body)+size > maxRecord {
			return nil, fmt.Errorf("record of more than %d bytes: not an RPC reply", maxRecord)
		}
		body = append(body, make([]byte, size)...)
		if _, err := io.ReadFull(r, body[len(body)-size:]); err != nil {
			return nil, err
		}
		if n&lastFrag != 0 {
			return body, nil
		}
	}
}

// results checks the reply header after the XID and returns the
// procedure's results.
func (c *Client) results(name string, body []byte) (*dec, error) {
	d := &dec{b: body}
	if mt := d.u32(); mt != msgReply {
		return nil, &RPCError{Proc: name, Reason: fmt.Sprintf("message type %d in a reply", mt)}
	}
	if d.u32() != replyOK {
		switch reject := d.u32(); reject {
		case 0:
			lo, hi := d.u32(), d.u32()
			return nil, &RPCError{Proc: name, Reason: fmt.Sprintf("call denied: RPC_MISMATCH (versions %d to %d)", lo, hi)}
		case 1:
			return nil, &RPCError{Proc: name, Reason: fmt.Sprintf("call denied: AUTH_ERROR %d", d.u32())}
		default:
			return nil, &RPCError{Proc: name, Reason: fmt.Sprintf("call denied: reject state %d", reject)}
		}
	}
	d.u32()    // verifier flavor
	d.opaque() // verifier body
	as := d.u32()
	switch {
	case d.bad:
		return nil, &RPCError{Proc: name, Reason: "reply header cut short"}
	case as == 2: // PROG_MISMATCH
		lo, hi := d.u32(), d.u32()
		return nil, &RPCError{Proc: name, Reason: fmt.Sprintf("call not accepted: PROG_MISMATCH (versions %d to %d)", lo, hi)}
	case as != acceptOK:
		state, ok := acceptStates[as]
		if !ok {
			state = "accept state"
		}
		return nil, &RPCError{Proc: name, Reason: fmt.Sprintf("call not accepted: %s (%d)", state, as)}
	}
	return d, nil
}

func (c *Client) timeout() time.Duration {
	if c.Timeout > 0 {
		return c.Timeout
	}
	return defTimeout
}

func (c *Client) retryDelay() time.Duration {
	if c.RetryDelay > 0 {
		return c.RetryDelay
	}
	return defRetryGap
}
