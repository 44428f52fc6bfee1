/// Process exit statuses from BSD `sysexits.h`, so scripts can tell a usage mistake
/// from bad data from an I/O failure.
public enum SysExit: Int32, Sendable {
    case ok = 0
    case usage = 64        // EX_USAGE: the command line was wrong
    case dataError = 65    // EX_DATAERR: the input was not what it claimed to be
    case noInput = 66      // EX_NOINPUT: an input file is missing or unreadable
    case unavailable = 69  // EX_UNAVAILABLE: the feature is not available (yet)
    case software = 70     // EX_SOFTWARE: an internal invariant failed
    case osError = 71      // EX_OSERR: the system refused a resource (memory)
    case cantCreate = 73   // EX_CANTCREAT: an output cannot be created
    case ioError = 74      // EX_IOERR: reading or writing failed
    case tempFail = 75     // EX_TEMPFAIL: not yet; try again later (a part of a partitioned run is unfinished)
    case noPermission = 77 // EX_NOPERM: a server refused the request (a missing or wrong credential)
}

/// Every error this project throws conforms, so one place can print it as a single
/// line and pick the exit status.
public protocol CkptError: Error, CustomStringConvertible {
    var exitStatus: SysExit { get }
}
