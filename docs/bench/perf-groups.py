#!/usr/bin/env python3
"""Groups a node profile's samples for "Why io_uring cannot be 30% ahead
here" in docs/BENCHMARKS.md: the network threads' share of all the node's
samples, split into the kernel's TCP/IP work, the network path's own
machinery, system call entry and scheduling, the rest of the kernel, and
user space less the path's machinery.

    perf record -F 999 -e cpu-clock -g -p $(pidof courier) -o node.data -- sleep 5
    docs/bench/perf-groups.py node.data courier-ring-0,courier-ring-1   # io_uring
    docs/bench/perf-groups.py node.data courier-io                      # epoll

A symbol goes to the first group whose pattern it matches, in the order
below.
"""
import re
import subprocess
import sys

KERNEL = [
    ("kernel TCP/IP, loopback and netfilter",
     r"tcp_|__tcp|inet_|ip_|__ip|nf_|ipt_|__nf|skb|sock_def|__inet|loopback|net_rx|__netif|netif_"
     r"|process_backlog|__dev|dev_|sk_|napi|validate_xmit|rcv|csum|__kfree_skb|kfree_skb"
     r"|copy_to_iter|copy_from_iter|_copy|__check_object|eth_|__sk|release_sock|lock_sock"),
    ("path machinery, kernel: epoll readiness",
     r"ep_|epoll|sock_poll|__pollwait|poll_ready|Registration|ScheduledIo|tokio::runtime::io"),
    ("path machinery, kernel: io_uring",
     r"io_uring|io_req|io_[a-z_]*$|__io_|io_file|io_issue|io_submit|io_poll|io_arm|io_queue|io_wq"
     r"|io_send|io_recv|io_read|io_write|io_cqring|io_fill|tctx|task_work"),
    ("system call entry, scheduling, locks",
     r"entry_SYSCALL|syscall|do_syscall|__x64|fget|fdget|fput|schedule|switch|finish_task"
     r"|pick_next|try_to_wake|_raw_spin|futex|enqueue|dequeue|update_|__wake|wake_up|irq|restore|native_"),
]
USER_MACHINERY = r"tokio::runtime::io|Registration|ScheduledIo|mio::|epoll|poll_ready|PollEvented|tokio_uring|io_uring::"


def main(data, comms):
    out = subprocess.run(
        ["perf", "report", "-i", data, "--comms", comms, "--no-children",
         "--sort", "dso,sym", "-g", "none", "--percent-limit", "0"],
        capture_output=True, text=True, check=True).stdout
    groups = {name: 0.0 for name, _ in KERNEL}
    other_kernel = user_machinery = user = total = 0.0
    for line in out.splitlines():
        m = re.match(r"\s*([\d.]+)%\s+(\S+)\s+\[(.)\]\s+(.*)", line)
        if not m:
            continue
        share, kind, sym = float(m.group(1)), m.group(3), m.group(4).strip()
        total += share
        if kind == ".":
            if re.search(USER_MACHINERY, sym):
                user_machinery += share
            else:
                user += share
            continue
        for name, pattern in KERNEL:
            if re.search(pattern, sym):
                groups[name] += share
                break
        else:
            other_kernel += share
    print(f"{comms}: {total:.1f}% of the node's samples")
    for name, share in groups.items():
        print(f"  {name}: {share:.1f}%")
    print(f"  the rest of the kernel: {other_kernel:.1f}%")
    print(f"  path machinery, user space (tokio's registrations or tokio-uring): {user_machinery:.1f}%")
    print(f"  user space, the rest (Courier's session code, allocator, tasks): {user:.1f}%")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
