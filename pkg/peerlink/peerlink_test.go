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
