// Command hello is the lab's managed service and its client:
//
//	hello serve -listen :8080 -name nodeA       answer "hello from nodeA"
//	hello connect -addr VIP:8080 -since NS      retry until answered; print
//	                                            the ms since NS and the answer
//	hello arpwatch -vip 10.250.0.100/24 -for 8s count who answers ARP for the VIP
//	hello probe -addr 10.250.0.100:8080 -for 60s ask every 50 ms, print the longest time without an answer
//	hello get -url http://127.0.0.1:9788/metrics print a page (no curl needed)
//
// arpwatch and probe stop early, printing what they saw, on SIGTERM.
package main

import (
	"bufio"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/duet-ha/duet/pkg/vip"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: hello serve|connect|arpwatch [flags]")
		os.Exit(2)
	}
	fs := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	listen := fs.String("listen", ":8080", "serve: address")
	name := fs.String("name", "", "serve: name to answer with")
	addr := fs.String("addr", "", "connect: service address")
	since := fs.Int64("since", 0, "connect: reference time, unix ns (default now)")
	timeout := fs.Duration("timeout", 30*time.Second, "connect: give up after")
	want := fs.String("want", "", "connect: wait for an answer from this name")
	vipArg := fs.String("vip", "", "arpwatch: VIP with prefix")
	iface := fs.String("iface", "eth0", "arpwatch: interface")
	dur := fs.Duration("for", 5*time.Second, "arpwatch: how long")
	url := fs.String("url", "", "get: address of the page")
	fs.Parse(os.Args[2:])
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(*listen, *name)
	case "connect":
		err = connect(*addr, *since, *timeout, *want)
	case "arpwatch":
		err = arpwatch(*vipArg, *iface, *dur)
	case "probe":
		err = probe(*addr, *dur)
	case "get":
		err = get(*url)
	default:
		err = fmt.Errorf("unknown mode %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "hello:", err)
		os.Exit(1)
	}
}

func get(url string) error {
	c := http.Client{Timeout: 5 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s", url, resp.Status)
	}
	_, err = io.Copy(os.Stdout, resp.Body)
	return err
}

func serve(listen, name string) error {
	ln, err := net.Listen("tcp", listen)
	if err != nil {
		return err
	}
	for {
		c, err := ln.Accept()
		if err != nil {
			return err
		}
		fmt.Fprintf(c, "hello from %s\n", name)
		c.Close()
	}
}

func connect(addr string, since int64, timeout time.Duration, want string) error {
	start := time.Now()
	if since != 0 {
		start = time.Unix(0, since)
	}
	// A dial to an address whose host is gone waits for its timeout: a
	// new one starts every 20 ms beside those still waiting, so that the
	// first answer is seen within 20 ms of when it could be had, not up
	// to a dial timeout later.
	answered := make(chan string, 1)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for deadline := time.Now().Add(timeout); time.Now().Before(deadline); {
		go func() {
			c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
			if err != nil {
				return
			}
			c.SetDeadline(time.Now().Add(time.Second))
			line, err := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if err == nil && (want == "" || strings.TrimSpace(line) == "hello from "+want) {
				select {
				case answered <- fmt.Sprintf("%d %s", time.Since(start).Milliseconds(), strings.TrimSpace(line)):
				default:
				}
			}
		}()
		select {
		case a := <-answered:
			fmt.Println(a)
			return nil
		case <-tick.C:
		}
	}
	return fmt.Errorf("no answer from %s within %s", addr, timeout)
}

// arpwatch probes the VIP repeatedly and prints the largest number of
// hosts that answered in one round, and who.
func arpwatch(p, iface string, d time.Duration) error {
	prefix, err := netip.ParsePrefix(p)
	if err != nil {
		return err
	}
	v := vip.VIP{Prefix: prefix, Iface: iface}
	most, rounds := 0, 0
	seen := map[string]bool{}
	stop := stopOnTerm()
	for end := time.Now().Add(d); time.Now().Before(end) && !stopped(stop); rounds++ {
		owners, err := v.Responders(150 * time.Millisecond)
		if err != nil {
			return err
		}
		most = max(most, len(owners))
		for _, o := range owners {
			seen[o.String()] = true
		}
	}
	var all []string
	for m := range seen {
		all = append(all, m)
	}
	fmt.Printf("%d %d %s\n", most, rounds, strings.Join(all, ","))
	return nil
}

// stopOnTerm returns a channel closed at SIGTERM or SIGINT.
func stopOnTerm() chan struct{} {
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
	stop := make(chan struct{})
	go func() {
		<-sig
		close(stop)
	}()
	return stop
}

func stopped(stop chan struct{}) bool {
	select {
	case <-stop:
		return true
	default:
		return false
	}
}

// probe asks the service every 50 ms (a fresh connection each time, as a
// client after a failover would) and prints the number of answers, the
// longest time without one in milliseconds, and the names that answered.
func probe(addr string, d time.Duration) error {
	stop := stopOnTerm()
	last := time.Now()
	var longest time.Duration
	answers := 0
	names := map[string]bool{}
	for end := time.Now().Add(d); time.Now().Before(end) && !stopped(stop); {
		c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
		if err == nil {
			c.SetDeadline(time.Now().Add(500 * time.Millisecond))
			line, rerr := bufio.NewReader(c).ReadString('\n')
			c.Close()
			if rerr == nil {
				answers++
				names[strings.TrimPrefix(strings.TrimSpace(line), "hello from ")] = true
				longest = max(longest, time.Since(last))
				last = time.Now()
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	longest = max(longest, time.Since(last))
	var all []string
	for n := range names {
		all = append(all, n)
	}
	fmt.Printf("%d %d %s\n", answers, longest.Milliseconds(), strings.Join(all, ","))
	return nil
}
