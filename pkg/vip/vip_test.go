package vip

import (
	"net"
	"net/netip"
	"os"
	"runtime"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// inNewNetns runs f on a thread in a network namespace of its own, with a
// veth "vip0" up (this kernel has no dummy interfaces). The thread is never
// returned to Go's pool.
func inNewNetns(t *testing.T, f func()) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: a network namespace and a veth")
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread() // not unlocked: the thread ends with the goroutine
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			t.Errorf("unshare: %v", err)
			return
		}
		if err := netlink.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "vip0"}, PeerName: "vip1"}); err != nil {
			t.Errorf("veth: %v", err)
			return
		}
		l, err := netlink.LinkByName("vip0")
		if err == nil {
			err = netlink.LinkSetUp(l)
		}
		if err != nil {
			t.Errorf("vip0 up: %v", err)
			return
		}
		f()
	}()
	<-done
}

// TestRemoveAnyPrefix: the address held with another prefix length than
// the configuration's (left as /32 by a crash under an older
// configuration, or added by hand) is removed too. The kernel deletes an
// address only with its prefix length and answers EADDRNOTAVAIL, which
// Remove took for "absent": it said the VIP was gone, and the peer's
// probe found it held for ever. From a review of d2087e5 (failed on it).
func TestRemoveAnyPrefix(t *testing.T) {
	inNewNetns(t, func() {
		v := VIP{Prefix: netip.MustParsePrefix("10.251.0.100/24"), Iface: "vip0"}
		l, err := netlink.LinkByName("vip0")
		if err != nil {
			t.Error(err)
			return
		}
		by32 := &netlink.Addr{IPNet: &net.IPNet{IP: net.IPv4(10, 251, 0, 100), Mask: net.CIDRMask(32, 32)}}
		if err := netlink.AddrAdd(l, by32); err != nil {
			t.Errorf("adding the address as /32: %v", err)
			return
		}
		if held, err := v.Held(); !held || err != nil {
			t.Errorf("Held with the address as /32: %v %v", held, err)
			return
		}
		if err := v.Remove(); err != nil {
			t.Errorf("Remove: %v", err)
		}
		if held, err := v.Held(); held || err != nil {
			t.Errorf("after Remove, the address (as /32) is still held: %v %v", held, err)
		}
		// Absent: no error.
		if err := v.Remove(); err != nil {
			t.Errorf("Remove of an absent address: %v", err)
		}
		// And the configured prefix, as Add puts it.
		if err := v.Add(); err != nil {
			t.Errorf("Add: %v", err)
			return
		}
		if err := v.Remove(); err != nil {
			t.Errorf("Remove after Add: %v", err)
		}
		if held, _ := v.Held(); held {
			t.Error("after Add and Remove, the address is still held")
		}
	})
}
