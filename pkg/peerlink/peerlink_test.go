package peerlink

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/wire"
)

var (
	keyA = []byte("key A: 0123456789abcdef")
	keyB = []byte("key B: 0123456789abcdef")
	keyC = []byte("key C: 0123456789abcdef")
)

func newLink(t *testing.T, plaintext bool, keys ...[]byte) *Link {
	t.Helper()
	l, err := New(Options{Node: "n", Keys: keys, Plaintext: plaintext})
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// exchange connects client to server over the loopback and has them
// trade a message each way; it returns each side's first error.
func exchange(t *testing.T, server, client *Link) (serverErr, clientErr error) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	// What a client sends first: a frame, as a duet in plaintext does.
	msg := wire.AppendFrame(nil, &wire.Frame{Type: wire.TypeHello, Payload: []byte("hello")})
	done := make(chan error, 1)
	go func() {
		raw, err := ln.Accept()
		if err != nil {
			done <- err
			return
		}
		defer raw.Close()
		raw.SetDeadline(time.Now().Add(10 * time.Second))
		c, err := server.Server(ctx, raw)
		if err == nil {
			b := make([]byte, len(msg))
			if _, err = io.ReadFull(c, b); err == nil {
				_, err = c.Write(b)
			}
		}
		done <- err
	}()
	c, err := client.Dial(ctx, &net.Dialer{Timeout: 5 * time.Second}, ln.Addr().String())
	if err == nil {
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err = c.Write(msg); err == nil {
			// A refusal comes as an error frame, as to wire.ClientHandshake.
			var f wire.Frame
			if f, err = wire.ReadFrame(c, nil); err == nil && f.Type == wire.TypeError {
				err = fmt.Errorf("peer refused: %s", f.Payload)
			}
		}
	}
	return <-done, err
}

// A key rotation: every pair of configurations the procedure goes
// through (the new key added on one node, then the other, the previous
// one removed from one, then the other) connects, in both directions;
// nodes whose keys have nothing in common do not.
func TestRotation(t *testing.T) {
	for _, tc := range []struct {
		name           string
		server, client [][]byte
		ok             bool
	}{
		{"same key", [][]byte{keyA}, [][]byte{keyA}, true},
		{"server rotated first", [][]byte{keyB, keyA}, [][]byte{keyA}, true},
		{"client rotated first", [][]byte{keyA}, [][]byte{keyB, keyA}, true},
		{"both rotated", [][]byte{keyB, keyA}, [][]byte{keyB, keyA}, true},
		{"server dropped previous first", [][]byte{keyB}, [][]byte{keyB, keyA}, true},
		{"client dropped previous first", [][]byte{keyB, keyA}, [][]byte{keyB}, true},
		{"different keys", [][]byte{keyB}, [][]byte{keyA}, false},
		{"unrelated to both", [][]byte{keyC}, [][]byte{keyB, keyA}, false},
		{"unrelated client", [][]byte{keyB, keyA}, [][]byte{keyC}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			serr, cerr := exchange(t, newLink(t, false, tc.server...), newLink(t, false, tc.client...))
			if tc.ok {
				if serr != nil || cerr != nil {
					t.Fatalf("server: %v; client: %v", serr, cerr)
				}
				return
			}
			if serr == nil || cerr == nil {
				t.Fatalf("connected with unrelated keys: server: %v; client: %v", serr, cerr)
			}
			// Both ends tell the operator the keys differ.
			for side, err := range map[string]error{"server": serr, "client": cerr} {
				if !strings.Contains(err.Error(), "keys differ (key / key_file") {
					t.Errorf("%s's error does not say the keys differ: %v", side, err)
				}
			}
		})
	}
}

// A node with insecure_plaintext_link and one without: both refuse, and
// each error names the setting.
func TestPlaintextMismatch(t *testing.T) {
	for _, tc := range []struct {
		name           string
		server, client *Link
	}{
		{"TLS server", newLink(t, false, keyA), newLink(t, true, keyA)},
		{"plaintext server", newLink(t, true, keyA), newLink(t, false, keyA)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			serr, cerr := exchange(t, tc.server, tc.client)
			for side, err := range map[string]error{"server": serr, "client": cerr} {
				if err == nil || !strings.Contains(err.Error(), "insecure_plaintext_link") {
					t.Errorf("%s: got %v, want an error naming insecure_plaintext_link", side, err)
				}
			}
		})
	}
	if serr, cerr := exchange(t, newLink(t, true, keyA), newLink(t, true, keyA)); serr != nil || cerr != nil {
		t.Fatalf("two plaintext nodes: server: %v; client: %v", serr, cerr)
	}
}

// Both nodes build the same CA certificate from the same key, and
// different ones from different keys.
func TestCADeterministic(t *testing.T) {
	a1, err := newCA(keyA)
	if err != nil {
		t.Fatal(err)
	}
	a2, _ := newCA(keyA)
	b, _ := newCA(keyB)
	if !bytes.Equal(a1.cert.Raw, a2.cert.Raw) {
		t.Fatal("two CA certificates built from the same key differ")
	}
	if bytes.Equal(a1.cert.RawSubject, b.cert.RawSubject) || a1.id == b.id {
		t.Fatal("the CAs of two keys have the same subject: a client cannot pick its certificate by the server's acceptable CAs")
	}
}

// tlsPair connects a client and a server of one key over the loopback.
func tlsPair(t *testing.T) (client, server net.Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	type accepted struct {
		c   net.Conn
		err error
	}
	done := make(chan accepted, 1)
	go func() {
		raw, err := ln.Accept()
		if err != nil {
			done <- accepted{err: err}
			return
		}
		c, err := newLink(t, false, keyA).Server(ctx, raw)
		if err != nil {
			raw.Close()
		}
		done <- accepted{c, err}
	}()
	client, err = newLink(t, false, keyA).Dial(ctx, &net.Dialer{Timeout: 5 * time.Second}, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	a := <-done
	if a.err != nil {
		client.Close()
		t.Fatal(a.err)
	}
	t.Cleanup(func() { client.Close(); a.c.Close() })
	return client, a.c
}

// A Write is with the peer without any later write: the records a large
// one gathers for the socket go out when it returns, whatever its size
// (a batch and the sync request a barrier waits for, coalesced, must
// not wait for the next batch).
func TestWriteReachesPeerAtOnce(t *testing.T) {
	client, server := tlsPair(t)
	for _, n := range []int{1, 4<<10 + 100, maxRecord - wire.HeaderSize, maxRecord, 64 << 10, socketChunk + 100, 4<<20 + 100} {
		for _, dir := range []struct {
			name     string
			from, to net.Conn
		}{{"client to server", client, server}, {"server to client", server, client}} {
			payload := bytes.Repeat([]byte{byte(n)}, n)
			// Written aside: a write larger than the sockets' buffers
			// returns only as the peer reads.
			wrote := make(chan error, 1)
			go func() {
				_, err := dir.from.Write(wire.AppendFrame(nil, &wire.Frame{Type: wire.TypeSync, Seq: uint64(n), Payload: payload}))
				wrote <- err
			}()
			// Generous on a loaded machine; a frame held back never comes.
			dir.to.SetReadDeadline(time.Now().Add(5 * time.Second))
			f, err := wire.ReadFrame(dir.to, nil)
			if err != nil {
				t.Fatalf("%s: a %d-byte frame did not reach the peer without a later write: %v", dir.name, n, err)
			}
			if f.Seq != uint64(n) || !bytes.Equal(f.Payload, payload) {
				t.Fatalf("%s: got frame %d of %d bytes, want %d", dir.name, f.Seq, len(f.Payload), n)
			}
			if err := <-wrote; err != nil {
				t.Fatalf("%s, %d bytes: %v", dir.name, n, err)
			}
		}
	}
}

// Frames written at once by several goroutines, large ones gathered and
// small ones not, each arrive whole and in each writer's order.
func TestConcurrentWrites(t *testing.T) {
	client, server := tlsPair(t)
	const writers, frames = 4, 40
	sizes := []int{100, maxRecord + 1, 300 << 10, 10}
	errc := make(chan error, writers)
	for w := range writers {
		go func() {
			for i := range frames {
				p := bytes.Repeat([]byte{byte(w)}, sizes[(w+i)%len(sizes)])
				if _, err := client.Write(wire.AppendFrame(nil, &wire.Frame{Type: wire.TypeBatch, Seq: uint64(i), Payload: p})); err != nil {
					errc <- err
					return
				}
			}
			errc <- nil
		}()
	}
	server.SetReadDeadline(time.Now().Add(30 * time.Second))
	next := make([]uint64, writers)
	for range writers * frames {
		f, err := wire.ReadFrame(server, nil)
		if err != nil {
			t.Fatal(err)
		}
		w := int(f.Payload[0])
		if f.Seq != next[w] || len(f.Payload) != sizes[(w+int(f.Seq))%len(sizes)] || bytes.Count(f.Payload, f.Payload[:1]) != len(f.Payload) {
			t.Fatalf("writer %d: got frame %d of %d bytes, want frame %d", w, f.Seq, len(f.Payload), next[w])
		}
		next[w]++
	}
	for range writers {
		if err := <-errc; err != nil {
			t.Fatal(err)
		}
	}
}
