/// A folder behind a URL (a bucket prefix, a Hub repo): files are asked for by name; a missing
/// one answers 404. Nothing can be listed.
public struct RemoteFolder: FolderStorage {
    public let location: RemoteLocation
    public var root: String { location.display }

    public init(_ location: RemoteLocation) { self.location = location }

    public func exists(_ relative: String) throws -> Bool { try RemoteObject.openIfPresent(location.appending(relative)) != nil }

    public func readWhole(_ relative: String, limit: Int) throws -> [UInt8] {
        try RemoteObject.open(location.appending(relative)).readAll(limit: limit)
    }

    public func open(_ relative: String) throws -> MappedFile? {
        try RemoteObject.openIfPresent(location.appending(relative)).map { try MappedFile(remote: $0) }
    }

    public func list(_ relative: String) -> [String]? { nil }

    public func countFiles(_ relative: String, atMost limit: Int, maxDepth: Int, matching: (String) -> Bool) -> Int? { nil }
}
