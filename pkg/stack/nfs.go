package stack

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// ONC RPC (RFC 5531) numbers of an NFSv4 NULL call.
const (
	rpcCall    = 0
	rpcReply   = 1
	rpcVersion = 2
	nfsProgram = 100003
	lastFrag   = 1 << 31
)

// errVersion is a server's answer that it does not serve the version asked.
var errVersion = errors.New("NFS version not served")

// NFSNull calls procedure 0 (NULL) of NFS at addr over TCP, version 4 and,
// if the server serves another, version 3 (duet's NFS server): the
// server's RPC layer and its NFS program must answer, which a bare TCP
// connect does not show.
func NFSNull(addr string, timeout time.Duration) error {
	err := nfsNull(addr, timeout, 4)
	if errors.Is(err, errVersion) {
		if err3 := nfsNull(addr, timeout, 3); err3 != nil {
			return fmt.Errorf("NFS version 4: %v; version 3: %w", err, err3)
		}
		return nil
	}
	return err
}

func nfsNull(addr string, timeout time.Duration, vers uint32) error {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(timeout))
	xid := uint32(time.Now().UnixNano())
	// xid, CALL, rpcvers, prog, vers, proc, cred AUTH_NONE, verf AUTH_NONE
	call := []uint32{xid, rpcCall, rpcVersion, nfsProgram, vers, 0, 0, 0, 0, 0}
	msg := make([]byte, 4+4*len(call))
	binary.BigEndian.PutUint32(msg, lastFrag|uint32(4*len(call)))
	for i, v := range call {
		binary.BigEndian.PutUint32(msg[4+4*i:], v)
	}
	if _, err := c.Write(msg); err != nil {
		return err
	}
	var mark [4]byte
	if _, err := io.ReadFull(c, mark[:]); err != nil {
		return fmt.Errorf("reading the reply: %w", err)
	}
	n := binary.BigEndian.Uint32(mark[:]) &^ lastFrag
	if n < 24 || n > 4096 {
		return fmt.Errorf("reply of %d bytes: not an RPC reply to NULL", n)
	}
	body := make([]byte, n)
	if _, err := io.ReadFull(c, body); err != nil {
		return fmt.Errorf("reading the reply: %w", err)
	}
	return parseNullReply(body, xid)
}

// parseNullReply checks an accepted, successful reply to call xid.
func parseNullReply(b []byte, xid uint32) error {
	word := func(i int) uint32 { return binary.BigEndian.Uint32(b[4*i:]) }
	if len(b) < 24 {
		return errors.New("short RPC reply")
	}
	if word(0) != xid || word(1) != rpcReply {
		return fmt.Errorf("not a reply to this call (xid %#x, type %d)", word(0), word(1))
	}
	if word(2) != 0 {
		return fmt.Errorf("call denied (reply_stat %d)", word(2))
	}
	// verifier: flavor, length, opaque body padded to 4 bytes
	vlen := (int(word(4)) + 3) &^ 3
	if vlen > len(b)-24 {
		return errors.New("malformed verifier in the RPC reply")
	}
	stat := binary.BigEndian.Uint32(b[20+vlen:])
	switch stat {
	case 0:
		return nil
	case 1:
		return errors.New("NFS program unavailable")
	case 2:
		return errVersion
	default:
		return fmt.Errorf("NULL call not accepted (accept_stat %d)", stat)
	}
}
