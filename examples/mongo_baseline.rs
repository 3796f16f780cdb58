//! Baselines for `benches/mongodb.sh`, with the same driver dbkeeper uses:
//! `load URI DB COLL N` fills a collection, `drain URI DB COLL` reads it through the raw batch
//! cursor and throws the bytes away, `insert URI DB COLL FILE.bson` inserts a `.bson` file's
//! documents with one plain unordered `insert_many`.

use std::io::Read;
use std::time::Instant;

use futures_util::StreamExt;
use mongodb::Client;
use mongodb::bson::{RawBsonRef, RawDocumentBuf, doc, rawdoc};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: mongo_baseline load|drain|insert URI DB COLL [N|FILE]";
    let (cmd, uri, db, coll) = match &args[1..] {
        [c, u, d, k, ..] => (c.as_str(), u, d, k),
        _ => return Err(usage.into()),
    };
    let client = Client::with_uri_str(uri).await?;
    let c = client.database(db).collection::<RawDocumentBuf>(coll);
    let start = Instant::now();
    match cmd {
        "load" => {
            let n: u64 = args.get(5).ok_or(usage)?.parse()?;
            let mut batch = Vec::with_capacity(10_000);
            for i in 0..n {
                batch.push(rawdoc! {
                    "_id": i as i64,
                    "name": format!("user-{i:08}"),
                    "email": format!("user{i}@example.com"),
                    "age": (i % 90) as i32,
                    "score": (i as f64) * 0.37,
                    "tags": ["a", "b", format!("t{}", i % 17)],
                    "addr": {"city": format!("city-{}", i % 1000), "zip": format!("{:05}", i % 99999)},
                });
                if batch.len() == 10_000 {
                    c.insert_many(std::mem::take(&mut batch))
                        .ordered(false)
                        .await?;
                }
            }
            if !batch.is_empty() {
                c.insert_many(batch).ordered(false).await?;
            }
            println!(
                "loaded {n} documents in {:.2}s",
                start.elapsed().as_secs_f64()
            );
        }
        "drain" => {
            let mut cursor = c.find(doc! {}).batch().await?;
            let (mut docs, mut bytes) = (0u64, 0u64);
            while let Some(b) = cursor.next().await {
                let b = b?;
                for d in b.doc_slices()? {
                    if let RawBsonRef::Document(d) = d? {
                        docs += 1;
                        bytes += d.as_bytes().len() as u64;
                    }
                }
            }
            let s = start.elapsed().as_secs_f64();
            println!(
                "drain docs={docs} bytes={bytes} secs={s:.3} mb_per_s={:.1}",
                bytes as f64 / s / 1e6
            );
        }
        "insert" => {
            let path = args.get(5).ok_or(usage)?;
            let mut data = Vec::new();
            std::fs::File::open(path)?.read_to_end(&mut data)?;
            let mut docs = Vec::new();
            let mut rest = &data[..];
            while rest.len() >= 4 {
                let n = u32::from_le_bytes(rest[..4].try_into()?) as usize;
                docs.push(RawDocumentBuf::from_bytes(rest[..n].to_vec())?);
                rest = &rest[n..];
            }
            let count = docs.len();
            let start = Instant::now();
            c.insert_many(docs).ordered(false).await?;
            let s = start.elapsed().as_secs_f64();
            println!(
                "insert_many docs={count} bytes={} secs={s:.3} mb_per_s={:.1}",
                data.len(),
                data.len() as f64 / s / 1e6
            );
        }
        _ => return Err(usage.into()),
    }
    Ok(())
}
