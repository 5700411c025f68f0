# Ruby side of the kb-ruby kernel: one long-lived process per kernel.
#
# Wire: JSON lines. Commands arrive on fd $KB_CMD_FD, events leave on fd $KB_EVENT_FD
# (see kernelspecs/_repl.py). $stdout/$stderr stay the real pipes and are unbuffered,
# so everything a cell printed is in the pipe before its "done" event is written.
# Every cell is evaluated in one persistent binding, so local variables, methods and
# constants survive from cell to cell. `exit n` raises SystemExit, which we rescue:
# the cell reports exit code n and the state is kept (only exit! kills the host).
require "json"

$stdout.sync = true
$stderr.sync = true

module KernelBridgeHost
  INTERRUPTED = 130 # shell convention for a program stopped by SIGINT

  # A binding with no locals of this file; self is `main` as in a script.
  USER_BINDING = TOPLEVEL_BINDING.eval("binding")

  @commands = IO.new(Integer(ENV.fetch("KB_CMD_FD")), "r")
  @events = IO.new(Integer(ENV.fetch("KB_EVENT_FD")), "w")
  # Children that user code spawns must not hold our pipes open.
  @commands.close_on_exec = true
  @events.close_on_exec = true
  @events.sync = true
  @running = false

  # If the kernel dies without closing our command pipe (SIGKILL while a cell
  # spins), a watcher thread notices we were reparented and ends the process.
  parent = Process.ppid
  Thread.new do
    loop do
      sleep 1
      Process.kill(:KILL, Process.pid) if Process.ppid != parent
    end
  end

  class << self
    attr_reader :running

    # The kernel ends a cell only after reading this marker on both streams (see _repl.py).
    def end_marker(id)
      marker = "\x01#{ENV.fetch("KB_END_TOKEN")}:#{id}\x01"
      [$stdout, $stderr].each do |io|
        io.write(marker)
        io.flush
      rescue IOError, SystemCallError
        nil # user code closed or replaced the stream; the kernel waits only briefly
      end
    end

    def emit(event)
      @events.write(JSON.generate(event) + "\n")
    end

    def traceback(error, cell)
      # Frames below the cell are this host's; keep only the user's.
      frames = (error.backtrace || []).take_while { |line| !line.start_with?(__FILE__) }
      frames = frames.select { |line| line.include?("cell-") }
      ["#{error.class}: #{error.message}", *frames.map { |line| "    from #{line}" }]
    end

    # A line for the running cell's $stdin: ask the kernel (which asks the frontend with an
    # input_request) and wait for its input_reply; nil is end-of-file.
    def ask_input
      id = @current
      return nil if id.nil?

      end_marker(id) # what the cell printed so far (its prompt) goes out before the request
      emit(ev: "input_request", id: id)
      loop do
        line = @commands.gets
        return nil if line.nil?

        command = JSON.parse(line)
        return command["value"] if command["op"] == "input_reply" && command["id"] == id
      end
    end

    def execute(id, code)
      exit_code = 0
      @current = id
      STDIN_FOR_CELLS.reset
      @running = true
      begin
        value = USER_BINDING.eval(code, "cell-#{id}.rb", 1)
        @running = false
        emit(ev: "result", id: id, text: value.inspect) unless value.nil?
      rescue SystemExit => e
        exit_code = e.status
      rescue Interrupt
        emit(ev: "error", id: id, ename: "Interrupt", evalue: "interrupted", traceback: ["Interrupt"])
        exit_code = INTERRUPTED
      rescue Exception => e # rubocop:disable Lint/RescueException -- user code may raise anything
        emit(ev: "error", id: id, ename: e.class.name, evalue: e.message, traceback: traceback(e, id))
        exit_code = 1
      ensure
        @running = false
      end
      @current = nil
      end_marker(id)
      emit(ev: "done", id: id, exit_code: exit_code)
    end

    def complete(id, code, cursor_pos)
      before = code[0, cursor_pos]
      dotted = before[/(?:[A-Za-z_@$][\w]*(?:(?:\.|::)[A-Za-z_]\w*)*)?(?:\.|::)?[A-Za-z_]?\w*[?!]?\z/] || ""
      sep = dotted.rindex(/\.|::/)
      prefix = sep ? dotted[(dotted.index(/\w*[?!]?\z/, sep))..] : dotted
      names =
        if sep
          receiver = dotted[0...sep]
          # Only a plain name chain is evaluated (no calls with arguments), to limit side effects.
          target = USER_BINDING.eval(receiver) rescue nil
          target.nil? ? [] : target.methods + (target.is_a?(Module) ? target.constants : [])
        else
          USER_BINDING.local_variables + USER_BINDING.receiver.private_methods +
            USER_BINDING.receiver.methods + Object.constants + global_variables +
            USER_BINDING.receiver.instance_variables
        end
      matches = names.map(&:to_s).uniq.select { |n| n.start_with?(prefix) }.sort
      emit(ev: "complete_reply", id: id, matches: matches,
           start: cursor_pos - prefix.length, end: cursor_pos)
    end
  end

  # $stdin of every cell. The host's real stdin is /dev/null; reads of $stdin (gets, Kernel#gets,
  # read, each_line) go to the frontend instead, a line at a time, as a terminal would.
  class CellInput
    def initialize
      reset
    end

    def reset
      @buffer = +""
      @eof = false
    end

    def gets(*)
      fill_line
      return nil if @buffer.empty?

      cut = @buffer.index("\n")
      cut ? @buffer.slice!(0..cut) : @buffer.slice!(0..)
    end

    def readline(*)
      gets || raise(EOFError, "end of file reached")
    end

    def each_line
      while (line = gets)
        yield line
      end
    end

    def readlines(*)
      lines = []
      each_line { |line| lines << line }
      lines
    end

    def read(*)
      readlines.join
    end

    def eof?
      fill_line
      @buffer.empty?
    end

    def getc
      fill_line
      @buffer.empty? ? nil : @buffer.slice!(0)
    end

    def tty? = false
    def isatty = false
    def fileno = 0
    def sync = true
    def sync=(_value); end
    def set_encoding(*) = self
    def external_encoding = Encoding::UTF_8

    private

    def fill_line
      until @eof || @buffer.include?("\n")
        value = KernelBridgeHost.ask_input
        if value.nil?
          @eof = true
        else
          @buffer << value << "\n"
        end
      end
    end
  end
  STDIN_FOR_CELLS = CellInput.new
  $stdin = STDIN_FOR_CELLS

  # SIGINT stops the running cell (Interrupt is raised where it is), but must not
  # kill an idle host.
  trap("INT") { raise Interrupt if KernelBridgeHost.running }

  emit(ev: "ready", runtime: "ruby #{RUBY_VERSION}")
  loop do
    line = begin
      @commands.gets
    rescue Interrupt
      next
    end
    break if line.nil? # the kernel closed our command pipe: do not outlive it

    command = JSON.parse(line)
    case command["op"]
    when "execute" then execute(command["id"], command["code"])
    when "complete" then complete(command["id"], command["code"], command["cursor_pos"])
    end
  end
end
