package nfsclient_test

import (
	"context"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/duet-ha/duet/pkg/nfsclient"
)

// TestDialReservedForeignLocalIP: a LocalAddr whose IP is not this host's
// makes every bind fail EADDRNOTAVAIL, which the loop took for a port in
// use: it tried all 424 ports and said none was free (a review).
func TestDialReservedForeignLocalIP(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.IPv4(192, 0, 2, 1)}}
	start := time.Now()
	_, err = nfsclient.DialReserved(context.Background(), d, "tcp", l.Addr().String())
	t.Logf("after %v: %v", time.Since(start), err)
	if err != nil && strings.Contains(err.Error(), "no privileged source port free") {
		t.Errorf("a local IP not on this host reported as port exhaustion: %v", err)
	}
}
