package replica

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/peerlink"
	"github.com/duet-ha/duet/pkg/wire"
)

// relay is an attacker on the path between a primary and its secondary,
// holding no key: it forwards both directions unit by unit (duet frames in
// plaintext, TLS records under TLS) and can put units of its own between
// them.
type relay struct {
	ln    net.Listener
	to    string
	mu    sync.Mutex
	conns []*relayConn
}

// relayConn is one relayed connection; each direction's mutex keeps its
// units whole when the relay injects.
type relayConn struct {
	toServer, toClient struct {
		sync.Mutex
		w net.Conn
	}
	tls  chan bool // whether the client opened with TLS, once known
	done chan struct{}
}

func newRelay(t *testing.T, to string) *relay {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	r := &relay{ln: ln, to: to}
	go r.serve()
	t.Cleanup(func() { ln.Close() })
	return r
}

func (r *relay) addr() string { return r.ln.Addr().String() }

// count is the number of connections relayed so far.
func (r *relay) count() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.conns)
}

// last is the latest connection relayed.
func (r *relay) last() *relayConn {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.conns[len(r.conns)-1]
}

func (r *relay) serve() {
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		s, err := net.Dial("tcp", r.to)
		if err != nil {
			c.Close()
			continue
		}
		rc := &relayConn{tls: make(chan bool, 1), done: make(chan struct{})}
		rc.toServer.w, rc.toClient.w = s, c
		r.mu.Lock()
		r.conns = append(r.conns, rc)
		r.mu.Unlock()
		var once sync.Once
		end := func() {
			once.Do(func() {
				c.Close()
				s.Close()
				close(rc.done)
			})
		}
		go func() { defer end(); rc.forward(c, &rc.toServer, true) }()
		go func() { defer end(); rc.forward(s, &rc.toClient, false) }()
	}
}

// forward copies units from src to dst.
func (rc *relayConn) forward(src net.Conn, dst *struct {
	sync.Mutex
	w net.Conn
}, client bool) {
	var head [1]byte
	if _, err := io.ReadFull(src, head[:]); err != nil {
		return
	}
	isTLS := head[0] == 0x16
	if client {
		rc.tls <- isTLS
	} else {
		isTLS = <-rc.tls
		rc.tls <- isTLS
	}
	unit := head[:]
	for {
		var err error
		if unit, err = readUnit(src, unit, isTLS); err != nil {
			return
		}
		dst.Lock()
		_, err = dst.w.Write(unit)
		dst.Unlock()
		if err != nil {
			return
		}
		unit = unit[:0]
	}
}

// readUnit reads the rest of one unit that starts with have: a TLS record
// (5-byte header, length at 3) or a duet frame (24-byte header, length at
// 16).
func readUnit(r io.Reader, have []byte, isTLS bool) ([]byte, error) {
	hdr, lenAt := wire.HeaderSize, 16
	if isTLS {
		hdr, lenAt = 5, 3
	}
	buf := make([]byte, hdr)
	copy(buf, have)
	if _, err := io.ReadFull(r, buf[len(have):]); err != nil {
		return nil, err
	}
	var n int
	if isTLS {
		n = int(binary.BigEndian.Uint16(buf[lenAt:]))
	} else {
		n = int(binary.LittleEndian.Uint32(buf[lenAt:]))
	}
	buf = append(buf, make([]byte, n)...)
	_, err := io.ReadFull(r, buf[hdr:])
	return buf, err
}

// inject puts frame into the connection's direction d between two
// units: as it is in plaintext, in a TLS application data record (the
// frame and 16 bytes where the AEAD tag goes) under TLS.
func (rc *relayConn) inject(d *struct {
	sync.Mutex
	w net.Conn
}, frame []byte) {
	isTLS := <-rc.tls
	rc.tls <- isTLS
	if isTLS {
		body := append(frame, make([]byte, 16)...)
		rec := []byte{0x17, 3, 3, 0, 0}
		binary.BigEndian.PutUint16(rec[3:], uint16(len(body)))
		frame = append(rec, body...)
	}
	d.Lock()
	d.w.Write(frame)
	d.Unlock()
}

// An on-path relay without the key forwards the handshake, then injects
// an acknowledgement of batch 2^40, durable, into the primary's stream
// and a batch that creates a set-uid file into the secondary's. Under TLS
// each end refuses the record (its MAC does not verify) and drops the
// connection; the primary reconnects, and replication goes on intact:
// nothing injected is in the replica, what the primary writes next is,
// and its acknowledgements count only batches it sent. In plaintext
// (insecure_plaintext_link, and every duet before TLS) the same relay
// wins: the file is created (an ack beyond the batches sent is refused
// since the forty-second session, but one within them would be taken).
func TestRelayCannotInject(t *testing.T) {
	for _, tc := range []struct {
		name      string
		plaintext bool
	}{
		{"tls", false},
		{"plaintext", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			lk := newTestLink([]byte("0123456789abcdef"), tc.plaintext)
			top := t.TempDir()
			logs := &syncBuffer{}
			sec := newTestSecondaryLink(t, filepath.Join(top, "state"), lk, slog.New(slog.NewTextHandler(logs, nil)))
			src := filepath.Join(top, "src")
			os.Mkdir(src, 0o755)
			os.WriteFile(filepath.Join(src, "before"), []byte("before the relay acts"), 0o644)
			rl := newRelay(t, sec.addr)
			p := runPrimary(t, src, rl.addr(), lk)

			streaming := func(conns int) {
				t.Helper()
				waitFor(t, fmt.Sprintf("replication over relayed connection %d", conns), func() bool {
					return rl.count() == conns && p.Streaming()
				})
			}
			// dropped waits for the relayed connection c to end.
			dropped := func(c *relayConn, what string) {
				t.Helper()
				select {
				case <-c.done:
				case <-time.After(10 * time.Second):
					t.Fatalf("the connection is still up 10 s after the relay injected %s", what)
				}
			}
			const forged = 1 << 40
			ack := wire.AppendFrame(nil, &wire.Frame{Type: wire.TypeAck, Flags: wire.FlagDurable, Seq: forged})
			raw := wire.AppendOp(nil, &wire.Op{Code: wire.OpCreate, Path: "injected", Mode: 0o4755})
			raw = wire.AppendOp(raw, &wire.Op{Code: wire.OpWrite, Path: "injected", Data: []byte("#!/bin/sh\nid\n")})
			batch := wire.AppendFrame(nil, &wire.Frame{Type: wire.TypeBatch, Seq: forged, Payload: raw})
			// Made without its set-uid bit, which only a setattr adds
			// (Applier.withholdSetid): there.
			injected := func() bool {
				_, err := os.Lstat(filepath.Join(sec.data, "injected"))
				return err == nil
			}

			streaming(1)
			if tc.plaintext {
				// An ack of a batch never sent is refused even so
				// (TestForgedAckBeyondSentRefused); the batch wins.
				c := rl.last()
				c.inject(&c.toClient, ack)
				dropped(c, "an ack beyond what was sent")
				waitFor(t, "the primary to name the forged ack", func() bool {
					return strings.Contains(p.Status().LastError, "beyond the last sent")
				})
				if st := p.Status(); st.Acked > st.Sent {
					t.Fatalf("the primary counts %d batches acknowledged of %d sent: the forged ack was taken", st.Acked, st.Sent)
				}
				streaming(2)
				c = rl.last()
				c.inject(&c.toServer, batch)
				waitFor(t, "the injected set-uid file in plaintext", injected)
				return
			}

			c := rl.last()
			c.inject(&c.toClient, ack)
			dropped(c, "an ack")
			waitFor(t, "the primary to report the forged record", func() bool {
				return strings.Contains(p.Status().LastError, "bad record MAC")
			})
			if st := p.Status(); st.Acked > st.Sent {
				t.Fatalf("the primary counts %d batches acknowledged of %d sent: the forged ack was taken", st.Acked, st.Sent)
			}

			streaming(2)
			c = rl.last()
			c.inject(&c.toServer, batch)
			dropped(c, "a batch")
			waitFor(t, "the secondary to report the forged record", func() bool {
				return strings.Contains(logs.String(), "bad record MAC")
			})

			// Replication goes on, over a new connection.
			streaming(3)
			os.WriteFile(filepath.Join(src, "after"), []byte("after the relay acted"), 0o644)
			p.Resync(false)
			waitFor(t, "the change after the injections to be replicated", func() bool {
				b, _ := os.ReadFile(filepath.Join(sec.data, "after"))
				st := p.Status()
				return string(b) == "after the relay acted" && st.InSync && st.Acked == st.Sent
			})
			if injected() {
				t.Error("the injected set-uid file is in the replica")
			}
			if _, err := os.Lstat(filepath.Join(sec.data, "injected")); err == nil {
				t.Error("the injected file is in the replica")
			}
		})
	}
}

// waitFor polls cond until it holds, failing the test after 20 s.
// runPrimary runs a Primary of src (directory "data") shipping to addr
// over lk until the test ends; without a kernel it makes full syncs only.
func runPrimary(t *testing.T, src, addr string, lk *peerlink.Link) *Primary {
	t.Helper()
	p, err := NewPrimary(Dir{Name: "data", Path: src}, addr, lk, 0, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { p.Close() })
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); p.Run(ctx, nil) }()
	t.Cleanup(func() { cancel(); wg.Wait() })
	return p
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(20 * time.Second); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}
