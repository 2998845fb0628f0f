package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"strings"
	"time"

	"github.com/csi-snap/csi-snap/driver"
)

// dropKillJournalMain is `csi-snap drop-kill-journal`: it asks the node
// plugin running on this node, whose store did not open because its kill
// journal is damaged, to open the store dropping the journal
// (driver.DropKillJournal), and prints what it did. Exit status: 0 done,
// 1 refused or failed, 2 bad usage.
func dropKillJournalMain(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("csi-snap drop-kill-journal", flag.ContinueOnError)
	fs.SetOutput(stderr)
	adminSock := adminSocketFlags(fs)
	timeout := fs.Duration("timeout", 10*time.Minute, "give up waiting after this long (opening the store replays its log)")
	fs.Usage = func() {
		fmt.Fprintln(stderr, "usage: csi-snap drop-kill-journal [--data-dir DIR | --run-dir DIR] [--timeout D]")
		fmt.Fprintln(stderr, "For a store that did not open because its kill journal is damaged: opens it dropping the journal, which loses each volume's writes since its last flush, as a power loss would. Volumes in use on the node fail their I/O until unstaged; the plugin then restarts.")
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 || *timeout <= 0 {
		fs.Usage()
		return 2
	}
	sock := adminSock()
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	res, err := requestDropKillJournal(ctx, sock)
	if err != nil {
		fmt.Fprintln(stderr, "csi-snap drop-kill-journal:", err)
		return 1
	}
	if res.Dropped {
		fmt.Fprintln(stdout, "dropped the store's damaged kill journal: each volume lost its writes since its last flush, as after a power loss")
	} else {
		fmt.Fprintln(stdout, "the store's kill journal was found sound (repaired since the plugin started) and redone: nothing lost")
	}
	if len(res.FencedVolumes) > 0 {
		fmt.Fprintf(stdout, "fenced (their devices fail every I/O until unstaged: delete the pods that use them; the next mount replays the filesystem's journal): %s\n", strings.Join(res.FencedVolumes, " "))
	}
	fmt.Fprintln(stdout, "the plugin now restarts to serve the store (its liveness probe fails; without one, restart it)")
	return 0
}

// requestDropKillJournal posts the request to the admin socket.
func requestDropKillJournal(ctx context.Context, sock string) (driver.DropKillJournalResponse, error) {
	var out driver.DropKillJournalResponse
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, "http://csi-snap"+driver.DropKillJournalPath, nil)
	if err != nil {
		return out, err
	}
	resp, err := adminClient(sock).Do(req)
	var de dialError
	switch {
	case errors.As(err, &de):
		return out, fmt.Errorf("no node plugin answering on %s (is this the plugin's container, and --run-dir right?): %w", sock, de.err)
	case err != nil:
		return out, fmt.Errorf("no answer from the plugin (%v): run the command again once it answers (dropped already, it answers that the store opens)", err)
	}
	return out, decodeAdminAnswer(resp, &out)
}
