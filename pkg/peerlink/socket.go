package peerlink

import (
	"bufio"
	"crypto/tls"
	"net"
	"sync"
)

// TLS cuts a stream into records of at most 16 KiB and crypto/tls writes
// each with its own system call, reading them one or two at a time: a
// 4 MiB batch cost 256 writes on one side and as many reads on the
// other, where plaintext takes a few. What the link gathers into one
// system call, at most:
const socketChunk = 256 << 10

// maxRecord is the largest payload of a TLS record.
const maxRecord = 16 << 10

// tlsConn is a TLS connection over a socket that gathers the records of
// one Write into writes of up to socketChunk bytes. Write returns, as
// tls.Conn's does, once every byte it was given is with the kernel: a
// frame (a sync request a barrier waits for) is never held back for
// more data.
type tlsConn struct {
	*tls.Conn
	sc *socket
	mu sync.Mutex // one gathering Write at a time
}

// newTLSConn wraps tc, whose handshake over sc is complete: the
// buffering starts once the peer is authenticated, so that a stranger's
// connection costs no buffers.
func newTLSConn(tc *tls.Conn, sc *socket) *tlsConn {
	sc.r = bufio.NewReaderSize(sc.Conn, socketChunk)
	return &tlsConn{Conn: tc, sc: sc}
}

// Sealed reports whether c is a connection this package made over TLS,
// whose records are authenticated (see wire.FlagSealed).
func Sealed(c net.Conn) bool {
	_, ok := c.(*tlsConn)
	return ok
}

func (c *tlsConn) Write(b []byte) (int, error) {
	if len(b) <= maxRecord {
		return c.Conn.Write(b) // one record, one write: nothing to gather
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.sc.gather()
	n, err := c.Conn.Write(b)
	if ferr := c.sc.release(); err == nil && ferr != nil {
		n, err = 0, ferr
	}
	return n, err
}

// socket is the TCP connection under a tlsConn. Reads go through a
// buffer (once set): one system call takes in as many records as the
// kernel holds, up to socketChunk bytes, and a read returns what is
// there without waiting for more. While gathering, writes (whole
// records) are kept and written out socketChunk bytes at a time and on
// release; otherwise they go straight through. Records of another
// goroutine's Write that tls.Conn orders in meanwhile (an alert, a key
// update's answer) go out at the release too.
type socket struct {
	net.Conn
	r *bufio.Reader // nil: unbuffered (during the handshake)

	mu        sync.Mutex
	gathering bool
	buf       []byte
	// err is the first failed write: the stream has a hole, nothing may
	// follow it.
	err error
}

func (s *socket) Read(b []byte) (int, error) {
	if s.r == nil {
		return s.Conn.Read(b)
	}
	return s.r.Read(b)
}

func (s *socket) Write(b []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		return 0, s.err
	}
	if !s.gathering {
		n, err := s.Conn.Write(b)
		s.err = err
		return n, err
	}
	if len(s.buf)+len(b) > socketChunk {
		if err := s.flushLocked(); err != nil {
			return 0, err
		}
	}
	s.buf = append(s.buf, b...)
	return len(b), nil
}

// gather keeps the writes that follow until release.
func (s *socket) gather() {
	s.mu.Lock()
	s.gathering = true
	s.mu.Unlock()
}

// release writes out what was gathered and writes through again.
func (s *socket) release() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.gathering = false
	if s.err != nil {
		return s.err
	}
	return s.flushLocked()
}

func (s *socket) flushLocked() error {
	if len(s.buf) == 0 {
		return nil
	}
	_, s.err = s.Conn.Write(s.buf)
	s.buf = s.buf[:0]
	return s.err
}
