"""modules/call_queue.py: the queue lock every generation takes (a FIFO lock in the real WebUI)."""

import threading

queue_lock = threading.Lock()
