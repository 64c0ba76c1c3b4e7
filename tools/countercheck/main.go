// Command countercheck checks the counter file of the Vagrant failover
// test (vagrant/failover-test.sh) against what the counter acknowledged.
//
// Each start of the counter container (vagrant/counter.yaml) is a run,
// named by its pod and start time. It appends "start RUN R" to the file, R
// being the last value the file held (where it resumes), then R+1, R+2, …
// one line each, each fsynced; on its output it prints "start RUN R", then
// "acked N" once N's fsync returned. The test keeps the output of the runs
// it follows (acks logs) and reads the file after each move of the stack.
//
// A check of the set of values alone passes when the last acknowledged
// values were lost: the next run resumes below them and writes them again.
// countercheck tells the values apart by the run that wrote them and fails
// when an acknowledged value is not among its run's lines, when a run
// resumes below a value acknowledged before it, when values skip or go
// back, and on a line that is neither a start record nor a value.
//
//	countercheck COUNTER-FILE ACKS-LOG...
//
// Exit status 0: no problem (the summary of the runs is printed); 1:
// problems, one a line; 2: a file could not be read.
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: countercheck COUNTER-FILE ACKS-LOG...")
		os.Exit(2)
	}
	acks := Acks{}
	for _, name := range os.Args[2:] {
		if err := readFile(name, func(f *os.File) error { return acks.ReadAcks(name, f) }); err != nil {
			fail(err)
		}
	}
	var problems []string
	var summary string
	err := readFile(os.Args[1], func(f *os.File) (err error) {
		problems, summary, err = Check(f, acks)
		return err
	})
	if err != nil {
		fail(err)
	}
	fmt.Println(summary)
	for _, p := range problems {
		fmt.Println("PROBLEM:", p)
	}
	if len(problems) > 0 {
		os.Exit(1)
	}
}

func readFile(name string, read func(*os.File) error) error {
	f, err := os.Open(name)
	if err != nil {
		return err
	}
	defer f.Close()
	return read(f)
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "countercheck:", err)
	os.Exit(2)
}
