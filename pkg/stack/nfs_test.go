package stack

import (
	"encoding/binary"
	"io"
	"net"
	"strings"
	"testing"
	"time"
)

// fakeRPC answers each call with reply(xid, version).
func fakeRPC(t *testing.T, reply func(xid, vers uint32) []uint32) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	answer := func(c net.Conn) {
		defer c.Close()
		var hdr [8]byte
		if _, err := io.ReadFull(c, hdr[:]); err != nil {
			return
		}
		n := binary.BigEndian.Uint32(hdr[:4]) &^ lastFrag
		rest := make([]byte, n-4)
		io.ReadFull(c, rest)
		// rest: type, rpcvers, prog, vers, ...
		words := reply(binary.BigEndian.Uint32(hdr[4:]), binary.BigEndian.Uint32(rest[12:]))
		out := make([]byte, 4+4*len(words))
		binary.BigEndian.PutUint32(out, lastFrag|uint32(4*len(words)))
		for i, w := range words {
			binary.BigEndian.PutUint32(out[4+4*i:], w)
		}
		c.Write(out)
	}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go answer(c)
		}
	}()
	return ln.Addr().String()
}

func TestNFSNull(t *testing.T) {
	for _, tc := range []struct {
		name  string
		reply func(xid, vers uint32) []uint32
		want  string
	}{
		{"ok", func(x, _ uint32) []uint32 { return []uint32{x, rpcReply, 0, 0, 0, 0} }, ""},
		{"ok with a verifier", func(x, _ uint32) []uint32 { return []uint32{x, rpcReply, 0, 1, 5, 0xaabbccdd, 0xee000000, 0} }, ""},
		{"no version served", func(x, _ uint32) []uint32 { return []uint32{x, rpcReply, 0, 0, 0, 2} }, "NFS version 4: NFS version not served; version 3: NFS version not served"},
		{"version 3 only", func(x, v uint32) []uint32 {
			if v == 4 {
				return []uint32{x, rpcReply, 0, 0, 0, 2}
			}
			return []uint32{x, rpcReply, 0, 0, 0, 0}
		}, ""},
		{"denied", func(x, _ uint32) []uint32 { return []uint32{x, rpcReply, 1, 0, 0, 0} }, "call denied"},
		{"other xid", func(x, _ uint32) []uint32 { return []uint32{x + 1, rpcReply, 0, 0, 0, 0} }, "not a reply to this call"},
		{"bad verifier", func(x, _ uint32) []uint32 { return []uint32{x, rpcReply, 0, 0, 400, 0} }, "malformed verifier"},
	} {
		err := NFSNull(fakeRPC(t, tc.reply), 2*time.Second)
		if tc.want == "" && err != nil || tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)) {
			t.Errorf("%s: got %v, want %q", tc.name, err, tc.want)
		}
	}
	// Not an RPC server at all: a clear error, no hang.
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.Write([]byte("HTTP/1.1 400 Bad Request\r\n\r\n"))
			c.Close()
		}
	}()
	if err := NFSNull(ln.Addr().String(), time.Second); err == nil {
		t.Fatal("an HTTP answer passed the NFS check")
	}
}
