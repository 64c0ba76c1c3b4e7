package vip

import (
	"encoding/binary"
	"fmt"
	"net"
	"os"
	"time"
)

// Ping sends one ICMP echo request to addr and waits up to timeout for
// the reply: the witness check that tells an isolated node from one
// whose peer died.
func Ping(addr string, timeout time.Duration) error {
	dst, err := net.ResolveIPAddr("ip4", addr)
	if err != nil {
		return fmt.Errorf("witness %q: %w", addr, err)
	}
	c, err := net.ListenPacket("ip4:icmp", "0.0.0.0")
	if err != nil {
		return fmt.Errorf("witness ping needs a raw socket (root): %w", err)
	}
	defer c.Close()
	id := uint16(os.Getpid())
	seq := uint16(time.Now().UnixNano())
	msg := make([]byte, 16)
	msg[0] = 8 // echo request
	binary.BigEndian.PutUint16(msg[4:], id)
	binary.BigEndian.PutUint16(msg[6:], seq)
	copy(msg[8:], "duet-wit")
	binary.BigEndian.PutUint16(msg[2:], checksum(msg))
	deadline := time.Now().Add(timeout)
	c.SetDeadline(deadline)
	if _, err := c.WriteTo(msg, dst); err != nil {
		return fmt.Errorf("witness %s: %w", addr, err)
	}
	buf := make([]byte, 1500)
	for {
		n, from, err := c.ReadFrom(buf)
		if err != nil {
			return fmt.Errorf("witness %s: no answer within %s", addr, timeout)
		}
		b := buf[:n]
		// Raw IPv4 sockets may hand over the IP header too.
		if n >= 20 && b[0]>>4 == 4 {
			b = b[int(b[0]&0x0f)*4:]
		}
		if len(b) >= 8 && b[0] == 0 && from.String() == dst.String() &&
			binary.BigEndian.Uint16(b[4:]) == id && binary.BigEndian.Uint16(b[6:]) == seq {
			return nil
		}
	}
}

func checksum(b []byte) uint16 {
	var s uint32
	for i := 0; i+1 < len(b); i += 2 {
		s += uint32(b[i])<<8 | uint32(b[i+1])
	}
	if len(b)%2 == 1 {
		s += uint32(b[len(b)-1]) << 8
	}
	for s>>16 != 0 {
		s = s&0xffff + s>>16
	}
	return ^uint16(s)
}
